"""The weighted k-NN classifier DINO is monitored with (eval_knn.py `knn_classifier`).

Features are L2-normalised; each test sample takes its k most cosine-similar training samples,
each neighbour votes for its label with weight exp(similarity / T), and the classes are ranked by
their summed votes. Returns top-1 and top-5 accuracy in percent (top-5 over min(5, k) classes, as
the reference). Test samples are processed in chunks so memory stays (chunk x N_train).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def weighted_knn(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07,
                 num_classes: int | None = None, chunk: int = 1024) -> tuple[float, float]:
    """(top-1 %, top-5 %) of the weighted k-NN vote; k is capped at the number of training samples."""
    if len(test_labels) == 0 or len(train_labels) == 0:
        raise ValueError("weighted_knn needs at least one training and one test sample")
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    train_labels, test_labels = train_labels.long(), test_labels.long()
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, train.shape[0])
    top1 = top5 = 0
    for start in range(0, test.shape[0], chunk):
        sims, idx = (test[start:start + chunk] @ train.T).topk(k, dim=1, largest=True, sorted=True)
        votes = torch.zeros(sims.shape[0], num_classes, dtype=sims.dtype, device=sims.device)
        votes.scatter_add_(1, train_labels[idx], (sims / temperature).exp())
        ranked = votes.argsort(dim=1, descending=True, stable=True)  # ties: lower class first
        correct = ranked.eq(test_labels[start:start + chunk, None])
        top1 += int(correct[:, :1].sum())
        top5 += int(correct[:, :min(5, k)].sum())
    n = test.shape[0]
    return 100.0 * top1 / n, 100.0 * top5 / n
