"""SoftTriple loss (Qian et al., ICCV 2019, "SoftTriple Loss: Deep Metric Learning Without Triplet
Sampling"), following the semantics of the authors' code (idstcv/SoftTriple).

Why this loss: every class is a set of K learnable centres, so a batch needs no triplet mining; the
softmax over a class's centres lets one class cover several visual modes (an emoji drawn by several
design sets), and the regulariser merges centres the data does not need.

Layout: `centers` is (embedding_dim, num_classes * K); column `c*K + k` is centre k of class c.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from baton.config import bounded


@dataclass
class SoftTripleConfig:
    """`loss.kwargs` of `loss.name: softtriple` (registered with the loss in
    finetune/losses/registry.py): the recipe's keys are checked against these fields (name, type,
    range) when the config is loaded, and the run's config.yaml records every one of them, the
    defaults included, so what the loss trained with is in the run directory. The defaults are the
    paper's CUB/CARS settings (the authors' code: K 10, lambda 20, 1/gamma 10, tau 0.2, delta 0.01)."""
    centers_per_class: int = bounded(10, ge=1)   # K centres per class
    la: float = bounded(20.0, gt=0)              # lambda, the scale of the similarities in the cross-entropy
    gamma: float = bounded(0.1, gt=0)            # temperature of the softmax over a class's centres
    tau: float = bounded(0.2, ge=0)              # weight of the centre regulariser (0: off, as pml's SoftTripleLoss)
    margin: float = 0.01                         # delta, subtracted from the true class's similarity


class SoftTriple(nn.Module):
    """SoftTriple: la-scaled softmax over relaxed class similarities, plus a centre regulariser.

    Args:
        num_classes: C, the number of training classes.
        embedding_dim: width of the (L2-normalised) embeddings.
        centers_per_class: K centres per class.
        la: the scale lambda applied to the similarities before the cross-entropy.
        gamma: temperature of the softmax over a class's centres (small = close to the max).
        tau: weight of the regulariser that pulls same-class centres together (0 disables it).
        margin: delta, subtracted from the similarity of the true class.
    """

    def __init__(self, num_classes: int, embedding_dim: int,
                 centers_per_class: int = SoftTripleConfig.centers_per_class, la: float = SoftTripleConfig.la,
                 gamma: float = SoftTripleConfig.gamma, tau: float = SoftTripleConfig.tau,
                 margin: float = SoftTripleConfig.margin):
        super().__init__()
        if num_classes < 1 or embedding_dim < 1 or centers_per_class < 1:
            raise ValueError("num_classes, embedding_dim and centers_per_class must be positive")
        if gamma <= 0:
            raise ValueError("gamma must be > 0 (it divides the similarities)")
        self.num_classes = int(num_classes)
        self.embedding_dim = int(embedding_dim)
        self.K = int(centers_per_class)
        self.la = float(la)
        self.gamma = float(gamma)
        self.tau = float(tau)
        self.margin = float(margin)
        self.centers = nn.Parameter(torch.empty(embedding_dim, num_classes * self.K))
        # Same initialisation as the official code (kaiming uniform with a=sqrt(5), the nn.Linear default).
        nn.init.kaiming_uniform_(self.centers, a=math.sqrt(5))

    def class_similarity(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Relaxed similarity to each class, (B, C): softmax(sim/gamma)-weighted mean over its K centres."""
        centers = F.normalize(self.centers, p=2, dim=0)
        sim = (embeddings @ centers).reshape(-1, self.num_classes, self.K)
        weights = F.softmax(sim / self.gamma, dim=2)
        return (weights * sim).sum(dim=2)

    def regularizer(self) -> torch.Tensor:
        """Mean distance between same-class centre pairs (i < j), as in the official code.

        Computed per class from a (C, K, K) Gram tensor rather than a (CK, CK) mask, so memory stays
        C*K*K (a thousand classes with K=10 would need a ~10^8-entry mask otherwise).
        """
        centers = F.normalize(self.centers, p=2, dim=0).reshape(self.embedding_dim, self.num_classes, self.K)
        gram = torch.einsum("dci,dcj->cij", centers, centers)
        iu = torch.triu_indices(self.K, self.K, offset=1, device=gram.device)
        pair_sim = gram[:, iu[0], iu[1]]
        dist = torch.sqrt(2.0 + 1e-5 - 2.0 * pair_sim)
        return dist.sum() / (self.num_classes * self.K * (self.K - 1.0))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.long()
        sim_class = self.class_similarity(embeddings)
        margin = torch.zeros_like(sim_class)
        margin[torch.arange(sim_class.shape[0], device=sim_class.device), labels] = self.margin
        loss = F.cross_entropy(self.la * (sim_class - margin), labels)
        if self.tau > 0 and self.K > 1:
            loss = loss + self.tau * self.regularizer()
        return loss

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, K={self.K}, "
                f"la={self.la}, gamma={self.gamma}, tau={self.tau}, margin={self.margin}")
