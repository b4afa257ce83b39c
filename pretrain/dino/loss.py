"""The DINO loss and the teacher-centre update (main_dino.py `DINOLoss`, the paper's Algorithm 1).

Student outputs hold all crops (2 global then the locals), teacher outputs the 2 global crops, each
as consecutive chunks of B rows. For every teacher view q and student view v != q:
    H(q, v) = mean_b  sum_k  -softmax((t_q - C) / temp_t)[b, k] * log_softmax(s_v / temp_s)[b, k]
and the loss is the mean of those terms. The teacher side carries no gradient. Afterwards the
centre moves towards the teacher's batch mean: C <- m C + (1 - m) mean(t), where the mean is over
the *global* batch (summed with an all-reduce over ranks when torch.distributed is initialised), so
N ranks of B samples update the centre exactly like one process with the N*B batch.

`dino.centering=sinkhorn_knopp` replaces the centre by DINOv2's Sinkhorn-Knopp teacher targets
(`sinkhorn_knopp_targets`): the teacher's softmax is rebalanced so that every prototype receives
the same total mass over the global batch. At small scale the centred softmax collapses to the
uniform distribution (BENCHMARKS.md, DINO); balanced assignments cannot, since each sample keeps a
sharp target while the batch as a whole uses every prototype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from baton.distributed import all_reduce


def dino_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, center: torch.Tensor, *,
              n_crops: int, teacher_temp: float, student_temp: float) -> torch.Tensor:
    """Scalar cross-entropy over all (teacher global view, other student view) pairs, averaged,
    with the reference's centred teacher softmax as the targets."""
    teacher_p = F.softmax((teacher_out.float() - center) / teacher_temp, dim=-1)
    return distillation_loss(student_out, teacher_p, n_crops=n_crops, student_temp=student_temp)


def distillation_loss(student_out: torch.Tensor, teacher_p: torch.Tensor, *, n_crops: int,
                      student_temp: float) -> torch.Tensor:
    """H(teacher_p[q], student view v) averaged over the pairs q != v; `teacher_p` holds the teacher's
    target distributions of the 2 global crops (centred softmax or Sinkhorn-Knopp)."""
    if student_out.shape[0] % n_crops or teacher_p.shape[0] * n_crops != student_out.shape[0] * 2:
        raise ValueError(f"student rows {student_out.shape[0]} must be {n_crops} crops and teacher rows "
                         f"{teacher_p.shape[0]} 2 crops of the same batch")
    student_logp = F.log_softmax(student_out.float() / student_temp, dim=-1).chunk(n_crops)
    teacher_p = teacher_p.detach().chunk(2)
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
    all_reduce(packed, "sum")
    batch_mean = (packed[:-1] / packed[-1]).unsqueeze(0)
    return center * momentum + batch_mean * (1.0 - momentum)


@torch.no_grad()
def sinkhorn_knopp_targets(teacher_out: torch.Tensor, teacher_temp: float, iterations: int = 3) -> torch.Tensor:
    """DINOv2's teacher targets (`SinkhornKnopp` of dinov2/loss/dino_clstoken_loss.py): Q = exp(t / temp)
    over (all global-crop rows of all ranks) x (prototypes), alternately scaled so that every prototype
    holds 1/K of the mass and every row 1/B, `iterations` times; returns each row's distribution
    (rows sum to 1). Sums over rows are all-reduced, so N ranks of B rows equal one process with N*B.
    The logits are shifted by their global maximum first (the first normalisation cancels it exactly)."""
    logits = teacher_out.detach().float() / teacher_temp
    top = all_reduce(logits.max().reshape(1), "max")
    q = torch.exp(logits - top).t()                     # K x B
    k = q.shape[0]
    rows = all_reduce(torch.tensor([float(q.shape[1])], device=q.device), "sum")
    q /= all_reduce(q.sum().reshape(1), "sum")
    for _ in range(iterations):
        q /= all_reduce(q.sum(dim=1, keepdim=True), "sum")  # each prototype: total mass 1 ...
        q /= k                                           # ... then 1/K
        q /= q.sum(dim=0, keepdim=True)                  # each row (sample): 1 ...
        q /= rows                                        # ... then 1/B
    q *= rows                                            # rows sum to 1 again
    return q.t()
