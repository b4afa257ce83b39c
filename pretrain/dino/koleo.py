"""The KoLeo regulariser of DINOv2 (Sablayrolles et al. 2019, "Spreading vectors for similarity
search"): -mean_i log(min_{j != i} ||x_i - x_j||) over L2-normalised features of one batch.

Why: it pushes each sample's feature away from its nearest neighbour, so the features spread over
the sphere instead of collapsing onto a few directions; DINOv2 adds it on the student's backbone
features of each global crop (weight 0.1). As in DINOv2 it is computed per rank, on the local batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scalar KoLeo loss of a (B, D) batch (B >= 2): nearest neighbours by cosine similarity of the
    normalised features, distances recomputed with gradient."""
    if features.shape[0] < 2:
        raise ValueError(f"KoLeo needs at least 2 samples per batch, got {features.shape[0]}")
    x = F.normalize(features.float(), dim=-1, eps=eps)
    with torch.no_grad():
        sim = x @ x.t()
        sim.fill_diagonal_(-2.0)                          # a sample is not its own neighbour
        nearest = sim.argmax(dim=1)
    dist = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
    return -torch.log(dist + eps).mean()
