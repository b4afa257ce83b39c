"""`ClipConfig`: the CLIP method's own config section (`clip:` in a recipe with `method: clip`).

Registered with the method in `pretrain/methods.py`; the engine's keys (data, optim, train, eval)
stay in `pretrain/config.py`. Before this section was the CLIP method's own, it was the top-level
`model:` section of every pretraining config; that spelling is still read, with a warning. The
engine's `eval:`, `data.caption` and `data.augment`, which only CLIP read, are `clip.eval`,
`clip.caption` and `clip.augment` now (FROM_SHARED_KEYS: the old spellings are read, with a warning).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, List, Optional

from baton.config import bounded
from pretrain.config import EvalConfig


@dataclass
class AugmentConfig:
    """Training augmentation, passed to open_clip's `AugmentationCfg` (eval only resizes)."""
    scale: List[float] = field(default_factory=lambda: [0.8, 1.0])   # RandomResizedCrop area (aspect 3/4-4/3)
    color_jitter: List[float] = field(default_factory=lambda: [0.2, 0.2, 0.1, 0.02])  # b, c, s, hue
    color_jitter_prob: float = bounded(0.5, ge=0, le=1)    # 0 disables colour jitter
    gray_scale_prob: float = bounded(0.0, ge=0, le=1)      # 0 disables random grayscale


@dataclass
class ClipEvalConfig(EvalConfig):
    """CLIP's held-out monitoring: zero-shot classification + image<->text retrieval on `shards`."""
    chunk_size: int = bounded(1024, ge=1)              # queries scored at a time (each against all candidates)
    # "simple": open_clip's SIMPLE_IMAGENET_TEMPLATES (7 prompts), "openai": its
    # OPENAI_IMAGENET_TEMPLATES (80), or a list of format strings with one "{}" for the class name.
    templates: Any = "simple"


@dataclass
class ClipConfig:
    """The open_clip model CLIP trains (pretrain/clip/model.py), its captions, augmentation and held-out monitoring."""
    FROM_SHARED_KEYS: ClassVar[dict] = {"eval": "clip.eval", "data.caption": "clip.caption",
                                        "data.augment": "clip.augment"}
    # open_clip model name, or open_clip's local-dir:DIR (a baton CLIP export: continue pretraining it) /
    # hf-hub:ORG/NAME (config, weights and preprocessing from there), or a label when `config` is set
    name: str = "ViT-B-16"
    # An open_clip model config dict (embed_dim, vision_cfg, text_cfg); when set it is built instead
    # of a named model. Typed Any (None by default: a named model) so the YAML gives the whole dict.
    config: Any = None
    pretrained: Optional[str] = None          # open_clip pretrained tag (named models) or checkpoint file
    # LiT: freeze the text tower (open_clip_train's --lock-text, --lock-text-unlocked-layers,
    # --lock-text-freeze-layer-norm); a wholly locked HF tower's features are cached per caption
    # (lock_text_cache distinct captions; 0: recomputed every step). pretrain/clip/locked_text.py
    lock_text: bool = False
    lock_text_unlocked_layers: int = bounded(0, ge=0)
    lock_text_freeze_layer_norm: bool = True
    lock_text_cache: int = bounded(200_000, ge=0)
    # What train.grad_accum > 1 contrasts (pretrain/clip/accumulation.py). full_batch: the loss over
    # the features of all the step's micro-batches, data.batch_size x grad_accum x ranks pairs, as
    # open_clip_train's --accum-freq and GradCache (each micro-batch forwarded twice). micro_batch:
    # each micro-batch's own loss (data.batch_size x ranks pairs), its gradients summed; one forward.
    accum_loss: str = "full_batch"
    caption: str = "txt"                # "txt" | "random" (one of txt + json["captions"], seeded)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # every train.eval_every steps (and at the end), on eval.shards (None: no evaluation)
    eval: ClipEvalConfig = field(default_factory=ClipEvalConfig)
