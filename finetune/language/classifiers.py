"""Image classifiers over a vocabulary of names, for pseudo-label guidance (PLG).

Each gives `logits(images) -> (N, V)` for PIL images and a `vocabulary` of V names.
- `TimmClassifier`: a timm ImageNet classifier (the paper's path: pretrained ResNet-50, ImageNet-1k
  names). Needs the weights (a hub download or timm's cache); tests pass a small random model.
- `ZeroShotClassifier`: a CLIP model's zero-shot classifier, logit_scale * cos(image, prompt(name)),
  over any vocabulary: baton's own CLIP from the handoff (no ImageNet classifier needed), or any
  open_clip model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from baton.errors import BatonError
from baton.registry import Registry


@torch.no_grad()
def _batched(fn: Callable[[torch.Tensor], torch.Tensor], transform: Callable, images: Sequence[Image.Image],
             batch_size: int, device: torch.device) -> torch.Tensor:
    from finetune.datasets import load_image

    out = [fn(torch.stack([transform(load_image(im)) for im in images[s:s + batch_size]]).to(device)).float().cpu()
           for s in range(0, len(images), batch_size)]
    return torch.cat(out)


class TimmClassifier:
    """A timm classifier; `model` may be given directly (tests), else built from `name`."""

    def __init__(self, name: str, vocabulary: Sequence[str], model: nn.Module | None = None,
                 pretrained: bool = True, device: str | torch.device = "cpu", batch_size: int = 64):
        import timm
        from timm.data import create_transform, resolve_data_config

        if model is None:
            try:
                model = timm.create_model(name, pretrained=pretrained)
            except Exception as e:  # no weights offline, unknown name
                raise BatonError(f"language.classifier=timm:{name}: cannot build it with pretrained weights "
                                 f"({e}); put the weights in timm's cache or use language.classifier=zeroshot") from None
        n_out = getattr(model, "num_classes", None)
        if n_out is not None and n_out != len(vocabulary):
            raise BatonError(f"timm:{name} has {n_out} outputs but the vocabulary has {len(vocabulary)} names; "
                             f"language.vocabulary must list the classifier's classes in order")
        self.model = model.eval().to(device)
        self.vocabulary = list(vocabulary)
        self.transform = create_transform(**resolve_data_config({}, model=model))
        self.device, self.batch_size = torch.device(device), batch_size
        self.description = f"timm {name}"

    def logits(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return _batched(self.model, self.transform, images, self.batch_size, self.device)


class ZeroShotClassifier:
    """CLIP zero-shot: one text embedding per name (prompted), images scored by scaled cosine."""

    def __init__(self, model: nn.Module, tokenizer: Callable, vocabulary: Sequence[str], transform: Callable,
                 prompt: str = "a photo of a {}", device: str | torch.device = "cpu", batch_size: int = 64,
                 description: str = "CLIP zero-shot"):
        from finetune.language.open_clip_text import encode_open_clip_texts

        self.model = model.eval().to(device)
        self.vocabulary = list(vocabulary)
        self.text = F.normalize(encode_open_clip_texts(self.model, tokenizer,
                                                       [prompt.format(n) for n in self.vocabulary]), dim=-1)
        self.transform = transform
        self.device, self.batch_size = torch.device(device), batch_size
        self.description = description

    def logits(self, images: Sequence[Image.Image]) -> torch.Tensor:
        feats = _batched(lambda x: self.model.encode_image(x, normalize=True), self.transform, images,
                         self.batch_size, self.device)
        return self.model.logit_scale.exp().item() * feats @ self.text.T


def _timm(arg: str, vocabulary: Sequence[str], prompt: str, backbone: str | Path, device) -> "TimmClassifier":
    return TimmClassifier(arg, vocabulary, device=device)


def _zeroshot_handoff(arg: str, vocabulary: Sequence[str], prompt: str, backbone: str | Path,
                      device) -> "ZeroShotClassifier":
    from finetune.language.handoff_text import load_handoff_clip
    from finetune.model import build_transform

    path = arg or backbone
    model, tok, meta = load_handoff_clip(path)
    return ZeroShotClassifier(model, tok, vocabulary, build_transform(meta.preprocess), prompt, device,
                              description=f"zero-shot CLIP of {path}")


def _zeroshot_open_clip(arg: str, vocabulary: Sequence[str], prompt: str, backbone: str | Path,
                        device) -> "ZeroShotClassifier":
    import open_clip

    from finetune.language.open_clip_text import build_open_clip

    name, _, tag = arg.partition("@")
    model, tok = build_open_clip(name, tag or None)
    pp = open_clip.get_model_preprocess_cfg(model)
    tf = open_clip.image_transform(pp["size"], is_train=False, mean=pp["mean"], std=pp["std"],
                                   interpolation=pp.get("interpolation", "bicubic"))
    return ZeroShotClassifier(model, tok, vocabulary, tf, prompt, device, description=f"zero-shot {arg}")


# `language.classifier` KIND[:SOURCE][:ARG] -> builder(ARG, vocabulary, prompt, backbone, device)
CLASSIFIERS = Registry("language.classifier", {
    "timm": _timm,
    "zeroshot": _zeroshot_handoff,             # the finetuned backbone's handoff CLIP
    "zeroshot:handoff": _zeroshot_handoff,
    "zeroshot:open_clip": _zeroshot_open_clip,
}, usage="zeroshot, zeroshot:handoff:DIR, zeroshot:open_clip:NAME[@TAG] or timm:NAME")


def build_classifier(spec: str, vocabulary: Sequence[str], prompt: str, backbone: str | Path,
                     device: str | torch.device = "cpu"):
    """`language.classifier` -> classifier: zeroshot | zeroshot:handoff:DIR | zeroshot:open_clip:NAME[@TAG] | timm:NAME."""
    kind, _, arg = spec.partition(":")
    if kind == "zeroshot":
        source, _, arg = arg.partition(":")
        kind = f"zeroshot:{source}" if source else kind
    return CLASSIFIERS[kind](arg, vocabulary, prompt, backbone, device)
