"""DML losses, by config name (`loss.name`).

Every entry is built as `build_loss(name, num_classes, embedding_dim, **params)` and called as
`loss(embeddings, labels)`. SoftTriple is ours (its own file); the pair-based losses come from
pytorch-metric-learning unchanged, so comparisons with them use the reference implementations.
Proxy-based losses have parameters (the optimiser gives them `optim.loss_lr`); pml's pair losses
mostly have none. The loss.* keys are SoftTriple's; pml losses run with their own defaults (which
are the published ones: margin 0.2 / beta 1.2, multi-similarity 2 / 40 / 0.5, triplet margin 0.05).
A pml miner (`loss.miner`, MINERS) picks the pairs/triplets a pair loss sees; language guidance
(finetune/losses/language_guidance.py) is added on top of any of these by the training loop.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from baton.errors import BatonError
from finetune.losses.language_guidance import LanguageGuidance
from finetune.losses.softtriple import SoftTriple


def _pml(cls_name: str, allowed: tuple[str, ...]) -> Callable[..., nn.Module]:
    def build(num_classes: int, embedding_dim: int, **params: Any) -> nn.Module:
        from pytorch_metric_learning import losses as pml_losses

        kwargs = {k: v for k, v in params.items() if k in allowed}
        if cls_name == "MarginLoss":
            kwargs.setdefault("num_classes", num_classes)  # per-class learnable beta
        return getattr(pml_losses, cls_name)(**kwargs)
    return build


def _softtriple(num_classes: int, embedding_dim: int, **params: Any) -> nn.Module:
    keys = ("centers_per_class", "la", "gamma", "tau", "margin")
    return SoftTriple(num_classes, embedding_dim, **{k: params[k] for k in keys if k in params})


# name -> builder(num_classes, embedding_dim, **params)
LOSSES: dict[str, Callable[..., nn.Module]] = {
    "softtriple": _softtriple,
    "margin": _pml("MarginLoss", ()),
    "multisimilarity": _pml("MultiSimilarityLoss", ()),
    "triplet": _pml("TripletMarginLoss", ()),
}


# name -> pml miner class name, built with pml's defaults (distance: the margin loss paper's sampling)
MINERS: dict[str, str] = {
    "multisimilarity": "MultiSimilarityMiner",
    "triplet": "TripletMarginMiner",
    "distance": "DistanceWeightedMiner",
    "batchhard": "BatchHardMiner",
}


class MinedLoss(nn.Module):
    """A pml pair/triplet loss fed the tuples its miner picks from the batch."""

    def __init__(self, loss: nn.Module, miner: nn.Module):
        super().__init__()
        self.loss, self.miner = loss, miner

    def forward(self, embeddings, labels):
        return self.loss(embeddings, labels, self.miner(embeddings, labels))


def build_loss(name: str, num_classes: int, embedding_dim: int, miner: str = "", **params: Any) -> nn.Module:
    if name not in LOSSES:
        raise BatonError(f"unknown loss.name '{name}'; choose one of: {', '.join(LOSSES)}")
    loss = LOSSES[name](num_classes, embedding_dim, **params)
    if not miner:
        return loss
    if miner not in MINERS:
        raise BatonError(f"unknown loss.miner '{miner}'; choose one of: {', '.join(MINERS)} (or '' for none)")
    if name == "softtriple":
        raise BatonError("loss.miner does not apply to loss.name=softtriple (a proxy loss sees no pairs); "
                         "set loss.miner ''")
    from pytorch_metric_learning import miners as pml_miners

    return MinedLoss(loss, getattr(pml_miners, MINERS[miner])())


__all__ = ["LOSSES", "MINERS", "LanguageGuidance", "MinedLoss", "SoftTriple", "build_loss"]
