"""baton's own image backbones, registered with timm so that every stage builds them by name.

timm's registry is the one place backbones are looked up in this project: the CLIP image tower
(open_clip's `timm_model_name`), the DINO backbone (`dino.backbone`), the handoff's timm builder,
finetuning's `timm:NAME` and `baton evaluate random --like`. Importing this package registers them
(so outside baton, loading an export with open_clip or timm needs only `import pretrain.models`);
`register_timm_models()` is kept for the builders, which call it to say why they import it.
"""

from __future__ import annotations

from pretrain.models import small_convnet  # noqa: F401  (its @register_model entries)


def register_timm_models() -> None:
    """Register baton's backbones with timm (idempotent: the import above registered them once)."""
