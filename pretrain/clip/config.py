"""`ClipConfig`: the CLIP method's own config section (`clip:` in a recipe with `method: clip`).

Registered with the method in `pretrain/methods.py`; the engine's keys (data, optim, train, eval)
stay in `pretrain/config.py`. Before this section was the CLIP method's own, it was the top-level
`model:` section of every pretraining config; that spelling is still read, with a warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from baton.config import bounded


@dataclass
class ClipConfig:
    """The open_clip model CLIP trains (pretrain/clip/model.py)."""
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
