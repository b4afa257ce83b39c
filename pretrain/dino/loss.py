"""The DINO loss and the teacher-centre update (main_dino.py `DINOLoss`, the paper's Algorithm 1).

Student outputs hold all crops (2 global then the locals), teacher outputs the 2 global crops, each
as consecutive chunks of B rows. For every teacher view q and student view v != q:
    H(q, v) = mean_b  sum_k  -softmax((t_q - C) / temp_t)[b, k] * log_softmax(s_v / temp_s)[b, k]
and the loss is the mean of those terms. The teacher side carries no gradient. Afterwards the
centre moves towards the teacher's batch mean: C <- m C + (1 - m) mean(t), where the mean is over
the *global* batch (summed with an all-reduce over ranks when torch.distributed is initialised), so
N ranks of B samples update the centre exactly like one process with the N*B batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def dino_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, center: torch.Tensor, *,
              n_crops: int, teacher_temp: float, student_temp: float) -> torch.Tensor:
    """Scalar cross-entropy over all (teacher global view, other student view) pairs, averaged."""
    if student_out.shape[0] % n_crops or teacher_out.shape[0] * n_crops != student_out.shape[0] * 2:
        raise ValueError(f"student rows {student_out.shape[0]} must be {n_crops} crops and teacher rows "
                         f"{teacher_out.shape[0]} 2 crops of the same batch")
    student_logp = F.log_softmax(student_out.float() / student_temp, dim=-1).chunk(n_crops)
    teacher_p = F.softmax((teacher_out.float() - center) / teacher_temp, dim=-1).detach().chunk(2)
    total, terms = student_out.new_zeros((), dtype=torch.float32), 0
    for q, p in enumerate(teacher_p):
        for v, logp in enumerate(student_logp):
            if v == q:  # a view is not distilled into itself
                continue
            total = total + torch.sum(-p * logp, dim=-1).mean()
            terms += 1
    return total / terms


@torch.no_grad()
def updated_center(center: torch.Tensor, teacher_out: torch.Tensor, momentum: float) -> torch.Tensor:
    """The new centre: momentum * center + (1 - momentum) * (teacher mean over the global batch)."""
    rows = teacher_out.detach().float()
    # one all-reduce of [sum of rows, row count]: ranks may hold different batch sizes
    packed = torch.cat([rows.sum(dim=0), rows.new_tensor([rows.shape[0]])])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(packed)
    batch_mean = (packed[:-1] / packed[-1]).unsqueeze(0)
    return center * momentum + batch_mean * (1.0 - momentum)
