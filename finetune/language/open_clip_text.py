"""Text encoder source: any open_clip text tower, by model name and pretrained tag
(`open_clip:ViT-B-32@openai`, the language model of the paper) or by model config dict.

The model is built once, embeds the names, and is dropped by the caller; nothing of it stays in
the training process.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from baton.errors import BatonError


@torch.no_grad()
def encode_open_clip_texts(model: nn.Module, tokenizer: Callable, texts: Sequence[str],
                           batch_size: int = 256) -> torch.Tensor:
    """(N, E) float32 CPU text features of a CLIP model (unnormalised; callers normalise)."""
    model.eval()
    device = next(model.parameters()).device
    out = [model.encode_text(tokenizer(list(texts[s:s + batch_size])).to(device)).float().cpu()
           for s in range(0, len(texts), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, 0)


def build_open_clip(name: str, pretrained: str | None = None, model_config: dict | None = None,
                    ) -> tuple[nn.Module, Callable]:
    """(CLIP model in eval mode, tokenizer): a named open_clip model (weights from `pretrained`,
    a tag or a file) or a literal model config (random init; the tests' tiny models)."""
    from pretrain.clip.model import build_clip, build_tokenizer
    from pretrain.clip.config import ClipConfig

    mcfg = ClipConfig(name=name, config=model_config, pretrained=pretrained)
    return build_clip(mcfg).eval(), build_tokenizer(mcfg)


class OpenClipText:
    """Names -> open_clip text features. `spec`: NAME or NAME@TAG (e.g. ViT-B-32@openai)."""

    def __init__(self, spec: str = "", model_config: dict | None = None):
        name, _, tag = spec.partition("@")
        if not name and model_config is None:
            raise BatonError("language.model=open_clip:NAME[@TAG] needs a model name, e.g. open_clip:ViT-B-32@openai")
        self.description = f"open_clip {spec or 'config'}"
        self.model, self.tokenizer = build_open_clip(name or "custom", tag or None, model_config)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        return encode_open_clip_texts(self.model, self.tokenizer, texts)
