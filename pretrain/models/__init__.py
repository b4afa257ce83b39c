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
    """Nothing to do: importing this package registered baton's backbones with timm. A builder that
    may be given one imports this function and calls it, so that its import of the package (made
    for that side effect) is visibly used, at the line that says why, and not dropped as unused."""
