"""Rebuild an exported image backbone from its handoff (`baton/handoff.py`).

Later stages call `load_backbone(dir)` and get a module mapping normalised images (B, 3, H, W)
to features (B, meta.embedding_dim), plus the metadata (a `baton.handoff.BackboneMeta`). Builders are
registered per `meta["library"]`, so another library (timm, for DINO backbones) is one function.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from baton.compat import build_open_clip_vision_tower
from baton.errors import BatonError
from baton.handoff import BackboneMeta, read_handoff
from baton.registry import Registry
from pretrain.models import register_timm_models


def _build_open_clip(meta: BackboneMeta) -> nn.Module:
    """The image tower of an open_clip model config, random init (only this tower is built).

    Uses the same builder `open_clip.CLIP.__init__` uses for `model.visual` (a private one:
    baton/compat.py), so the exported state dict (taken from `model.visual`) loads with strict
    key matching.
    """
    if meta.tower != "visual":
        raise BatonError(f"open_clip backbone tower {meta.tower!r} is not supported; only 'visual'")
    cfg = meta.open_clip_config()
    return build_open_clip_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=cfg.get("quick_gelu", False))


def _build_timm(meta: BackboneMeta) -> nn.Module:
    """A timm feature extractor (classifier removed), random init: `model_config` holds the
    `timm.create_model` kwargs (model_name, num_classes=0, ...)."""
    import timm

    return timm.create_model(**{**meta.model_config, "pretrained": False})


# meta["library"] -> builder(meta) -> randomly initialised module
BUILDERS = Registry("backbone library", {
    "open_clip": _build_open_clip,
    "timm": _build_timm,
})


def build_backbone(meta: BackboneMeta | Mapping[str, Any]) -> nn.Module:
    """A randomly initialised backbone described by handoff metadata (a backbone.json dict reads too)."""
    meta = BackboneMeta.from_dict(meta)
    library = meta.library
    builder = BUILDERS[library]
    for key in ("model_config", "embedding_dim"):
        if not getattr(meta, key):
            raise BatonError(f"backbone metadata has no '{key}' (missing or empty); it describes the "
                             f"architecture to rebuild: re-export the backbone with `baton export`")
    register_timm_models()  # either library may name one of baton's timm models
    try:
        return builder(meta)
    except (TypeError, KeyError, ValueError, RuntimeError) as e:
        raise BatonError(f"backbone metadata's model_config does not build a {library} model "
                         f"({type(e).__name__}: {e}); re-export the backbone with `baton export`") from None


def load_backbone(path: str | Path) -> tuple[nn.Module, BackboneMeta]:
    """(module with the handoff's weights, in eval mode; metadata) from a handoff directory."""
    state, meta = read_handoff(path)
    module = build_backbone(meta)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise BatonError(f"{path}: weights do not match the architecture in its backbone.json: {e}") from None
    return module.eval(), meta


def keep_batchnorm_statistics(module: nn.Module) -> None:
    """Put every BatchNorm layer of `module` in eval mode: its running statistics stay the starting
    weights' (its affine weights still learn). Called after `.train()` by a model whose backbone
    starts from pretrained weights and sees batches unlike the ones it was trained on (the DML
    recipes' small class-balanced batches, GLIP's scenes: GLIP freezes its ResNet's BatchNorm)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
