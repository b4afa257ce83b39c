"""Text encoder source: the text tower of baton's own CLIP, exported beside the image backbone
(`baton export` writes `text_tower.safetensors` and backbone.json's `text` entry).

When the backbone came from baton's CLIP pretraining this costs no extra model: class names are
embedded by the encoder the image tower was aligned with. `load_handoff_clip` rebuilds the whole
CLIP (image tower from backbone.safetensors, the rest from text_tower.safetensors), which the
zero-shot pseudo-label classifier uses too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from baton.errors import BatonError
from baton.handoff import BackboneMeta, handoff_dir, read_handoff, read_text_tower
from finetune.language.open_clip_text import build_open_clip, encode_open_clip_texts


def load_handoff_clip(path: str | Path) -> tuple[nn.Module, Callable, BackboneMeta]:
    """(full CLIP model in eval mode, tokenizer, backbone.json) of a handoff with a text tower."""
    visual, meta = read_handoff(path)
    text, _ = read_text_tower(path, meta)  # refused with the file named when absent or changed
    model, tokenizer = build_open_clip(meta.architecture or "handoff", None, meta.open_clip_config())
    state = {f"visual.{k}": v for k, v in visual.items()}
    state.update(text)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise BatonError(f"{handoff_dir(path)}: weights do not match the CLIP config in backbone.json: {e}") from None
    return model.eval(), tokenizer, meta


class HandoffText:
    """Names -> text features of the handoff's CLIP text tower."""

    def __init__(self, path: str | Path):
        self.model, self.tokenizer, _ = load_handoff_clip(path)
        self.description = f"CLIP text tower of {path}"

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        return encode_open_clip_texts(self.model, self.tokenizer, texts)
