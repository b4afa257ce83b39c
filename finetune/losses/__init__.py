"""DML losses, by config name (`loss.name`).

Every entry is built as `build_loss(name, num_classes, embedding_dim, **params)` and called as
`loss(embeddings, labels)`. SoftTriple is ours (its own file); the pair-based losses come from
pytorch-metric-learning unchanged, so comparisons with them use the reference implementations.
Proxy-based losses have parameters (the optimiser gives them `optim.loss_lr`); pml's pair losses
mostly have none. The loss.* keys are SoftTriple's; pml losses run with their own defaults.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from baton.errors import BatonError
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


def build_loss(name: str, num_classes: int, embedding_dim: int, **params: Any) -> nn.Module:
    if name not in LOSSES:
        raise BatonError(f"unknown loss.name '{name}'; choose one of: {', '.join(LOSSES)}")
    return LOSSES[name](num_classes, embedding_dim, **params)


__all__ = ["LOSSES", "SoftTriple", "build_loss"]
