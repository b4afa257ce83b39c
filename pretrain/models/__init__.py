"""baton's own image backbones, registered with timm so that every stage builds them by name.

timm's registry is the one place backbones are looked up in this project: the CLIP image tower
(open_clip's `timm_model_name`), the DINO backbone (`dino.backbone`), the handoff's timm builder,
finetuning's `timm:NAME` and `baton evaluate random --like`. A model defined here is registered as
soon as `register_timm_models()` has run, which every one of those builders calls first.
"""

from __future__ import annotations


def register_timm_models() -> None:
    """Register baton's backbones with timm (idempotent: the import registers them once)."""
    from pretrain.models import small_convnet  # noqa: F401  (its @register_model entries)
