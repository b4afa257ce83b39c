"""The embedding model DML trains: pretrained backbone -> linear head -> L2 normalisation.

The backbone is rebuilt by `pretrain.backbones` from the handoff (this stage never reimplements
it). The head maps the backbone's feature width to `model.embedding_dim`; normalising makes inner
product = cosine similarity, which SoftTriple and the faiss inner-product index both assume.

A finetuned model is saved as a directory (`run_dir/model/`):

    model.safetensors   the EmbeddingModel state dict (backbone.* and head.*)
    model.json          {"format": "baton-embedder/1", "backbone": <the handoff's backbone.json>,
                         "head": {"in_dim": D, "out_dim": E} or null, "embedding_dim": E,
                         "preprocess": {...}, "source": {...}}

so `baton evaluate` rebuilds it from the handoff metadata alone, without the training config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision import transforms as T

from baton.errors import BatonError
from baton.handoff import META as HANDOFF_META
from baton.handoff import BackboneMeta, read_meta
from baton.io import atomic_path, write_json_atomic
from baton.registry import Registry, unknown_name

FORMAT = "baton-embedder/1"
WEIGHTS = "model.safetensors"
META = "model.json"


class EmbeddingModel(nn.Module):
    """backbone (B,3,H,W) -> (B, D); optional linear head D -> E; L2-normalised output.

    `freeze_batchnorm`: the backbone's BatchNorm layers stay in eval mode during training (their
    running statistics are the pretrained ones; their affine weights still learn), the switch of
    the published DML recipes (Roth et al.: small class-balanced batches make batch statistics
    noisy)."""

    def __init__(self, backbone: nn.Module, backbone_dim: int, embedding_dim: int | None,
                 freeze_batchnorm: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone_dim, embedding_dim) if embedding_dim else None
        self.embedding_dim = embedding_dim or backbone_dim
        self.freeze_batchnorm = freeze_batchnorm

    def train(self, mode: bool = True) -> "EmbeddingModel":
        super().train(mode)
        if mode and self.freeze_batchnorm:
            _backbones().keep_batchnorm_statistics(self.backbone)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.backbone(images)
        if isinstance(x, (tuple, list)):  # some towers return (pooled, tokens)
            x = x[0]
        if self.head is not None:
            x = self.head(x)
        return F.normalize(x.float(), p=2, dim=1)


class PixelEmbedder(nn.Module):
    """Baseline: the (16x16, RGB) pixels themselves, flattened; its transform does the resize."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(images.flatten(1).float(), p=2, dim=1)


def _interp(name: str) -> T.InterpolationMode:
    try:
        return T.InterpolationMode(name.lower())
    except ValueError:
        raise unknown_name("preprocess.interpolation", name, [m.value for m in T.InterpolationMode]) from None


def build_transform(preprocess: dict, train: bool = False, crop_scale_min: float = 0.6,
                    hflip: bool = False, crop_padding: int = 0) -> Callable[[Image.Image], torch.Tensor]:
    """Images -> normalised tensors as the handoff says. Training adds a random resized crop
    (scale crop_scale_min..1; 1 disables it), then a random crop of the image padded by `crop_padding`
    pixels on each side (edge pixels repeated: the small-image datasets' standard shift of a few
    pixels, 0 disables it), and an optional flip, off by default because a
    mirrored emoji (arrows, hands) is sometimes a different class. At test time a
    `preprocess["resize"]` larger than image_size resizes the shorter side to it and centre-crops
    (the DML benchmarks' 256 -> 224); otherwise the image is resized to image_size squared."""
    try:
        size = int(preprocess["image_size"])
        mean, std = list(preprocess["mean"]), list(preprocess["std"])
    except (KeyError, TypeError) as e:
        raise BatonError(f"backbone preprocess metadata lacks {e}; expected image_size, mean, std, "
                         f"interpolation (re-export the backbone)") from None
    interp = _interp(preprocess.get("interpolation", "bicubic"))
    steps: list[Any] = []
    if train and crop_scale_min < 1.0:
        steps.append(T.RandomResizedCrop(size, scale=(crop_scale_min, 1.0), interpolation=interp,
                                         antialias=True))
    elif not train and int(preprocess.get("resize", 0) or 0) > size:  # DML benchmarks: 256 -> centre 224
        steps += [T.Resize(int(preprocess["resize"]), interpolation=interp, antialias=True), T.CenterCrop(size)]
    else:
        steps.append(T.Resize((size, size), interpolation=interp, antialias=True))
    # the shift and flip act on the tensor: padding a tensor costs a fraction of padding a PIL image
    # (a demo sample 0.42 ms instead of 0.77), with the same random draws and the same pixels
    steps.append(T.ToTensor())
    if train and crop_padding > 0:
        steps.append(T.RandomCrop(size, padding=crop_padding, padding_mode="edge"))
    if train and hflip:
        steps.append(T.RandomHorizontalFlip())
    steps.append(T.Normalize(mean, std))
    return T.Compose(steps)


@dataclass
class Embedder:
    """What `baton evaluate` embeds with: a module, its test-time transform and a description."""
    model: nn.Module
    transform: Callable[[Image.Image], torch.Tensor]
    description: str
    meta: dict  # what `baton evaluate` records about the model (kind, its backbone's metadata)


@torch.no_grad()
def embed_images(model: nn.Module, transform: Callable, images: Sequence[Image.Image],
                 batch_size: int = 128, device: str | torch.device = "cpu", desc: str = "") -> np.ndarray:
    """(N, E) float32 embeddings of PIL images (or image paths), in order, with the model in eval
    mode; `desc`: a progress bar of that name (on a terminal)."""
    from baton.progress import progress_bar
    from finetune.datasets import load_image

    was_training = model.training
    model.eval()
    out = []
    bar = progress_bar(len(images), desc, enabled=bool(desc), unit="img")
    for s in range(0, len(images), batch_size):
        x = torch.stack([transform(load_image(im)) for im in images[s:s + batch_size]]).to(device)
        out.append(model(x).float().cpu())
        bar.update(x.shape[0])
    bar.close()
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def _backbones():
    try:
        from pretrain import backbones
    except ImportError as e:
        raise BatonError(f"cannot import pretrain.backbones ({e}); finetuning rebuilds backbones "
                         f"with it: install the full baton package") from None
    return backbones


def build_backbone(meta: BackboneMeta) -> nn.Module:
    return _backbones().build_backbone(meta)


def load_timm_backbone(name: str, pretrained: bool = True) -> tuple[nn.Module, BackboneMeta]:
    """`backbone: timm:NAME`: released timm weights, classifier removed (pretrain.timm_weights)."""
    _backbones()  # a clear error when pretrain (which holds the loaders) is not installed
    from pretrain.timm_weights import load_timm_backbone as load

    return load(name, pretrained=pretrained)


def load_open_clip_backbone(spec: str) -> tuple[nn.Module, BackboneMeta]:
    """`backbone: open_clip:SPEC`: the image tower of open_clip weights (pretrain.clip.open_clip_weights)."""
    _backbones()  # a clear error when pretrain (which holds the loaders) is not installed
    from pretrain.clip.open_clip_weights import load_open_clip_backbone as load

    return load(spec)


def load_random_backbone(like: str) -> tuple[nn.Module, BackboneMeta]:
    """`backbone: random:DIR`: the architecture of the handoff DIR, randomly initialised from
    torch's global generator (what training from scratch starts from, beside it pretrained)."""
    # no trained text tower belongs to a random image tower
    meta = read_meta(like).replace(source={"random_init_like": like}, text=None)
    return build_backbone(meta), meta


# `backbone: KIND:ARG` -> loader(ARG); anything else is a `baton export` handoff directory
BACKBONE_KINDS = Registry("backbone", {
    "timm": load_timm_backbone,
    "open_clip": load_open_clip_backbone,
    "random": load_random_backbone,
})


def load_backbone(path: str | Path) -> tuple[nn.Module, BackboneMeta]:
    """A `baton export` handoff directory; `timm:NAME` (pretrained ImageNet weights via timm);
    `open_clip:SPEC` (released open_clip weights NAME@TAG, an open_clip_train checkpoint, a
    local-dir: export); or `random:DIR` (`load_random_backbone`)."""
    kind, sep, arg = str(path).partition(":")
    if sep and kind in BACKBONE_KINDS:
        return BACKBONE_KINDS[kind](arg)
    return _backbones().load_backbone(path)


def save_embedding_model(model: EmbeddingModel, backbone_meta: BackboneMeta, out_dir: str | Path,
                         source: dict | None = None) -> Path:
    """Write `out_dir/{model.safetensors, model.json}` atomically (the directory as a whole); the
    backbone's entry is its handoff metadata in backbone.json's form (`baton.handoff`)."""
    backbone_meta = BackboneMeta.from_dict(backbone_meta)
    out_dir = Path(out_dir)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    head = None
    if model.head is not None:
        head = {"in_dim": model.head.in_features, "out_dim": model.head.out_features}
    meta = {"format": FORMAT, "backbone": backbone_meta.to_dict(), "head": head,
            "embedding_dim": model.embedding_dim, "preprocess": backbone_meta.preprocess,
            "source": source or {}}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / WEIGHTS))
        write_json_atomic(tmp / META, meta)
    return out_dir


def find_model_dir(path: str | Path) -> Path | None:
    """A finetuned model directory at `path` or `path/model` (a run directory), else None."""
    p = Path(path)
    for c in (p, p / "model"):
        if (c / META).is_file() and (c / WEIGHTS).is_file():
            return c
    return None


def load_embedding_model(path: str | Path) -> tuple[EmbeddingModel, dict]:
    d = find_model_dir(path)
    if d is None:
        raise BatonError(f"no finetuned model at {path}: expected {META} and {WEIGHTS} there or in "
                         f"{Path(path) / 'model'} (run `baton finetune CONFIG` first)")
    meta = json.loads((d / META).read_text())
    if meta.get("format") != FORMAT:
        raise BatonError(f"{d / META}: unknown format {meta.get('format')!r}, expected {FORMAT!r}")
    backbone_meta = BackboneMeta.from_dict(meta.get("backbone") or {}, f"{d / META}'s backbone")
    head = meta.get("head")
    model = EmbeddingModel(build_backbone(backbone_meta), backbone_meta.embedding_dim,
                           int(head["out_dim"]) if head else None)
    missing, unexpected = model.load_state_dict(load_file(str(d / WEIGHTS)), strict=False)
    if missing or unexpected:
        raise BatonError(f"{d / WEIGHTS} does not match the architecture in {d / META} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]}); re-run the finetune")
    return model, meta


def resolve_embedder(spec: str, like: str | None = None, seed: int = 0) -> Embedder:
    """Turn `baton evaluate`'s MODEL argument into an Embedder.

    `pixels`: raw 16x16 pixels (a floor any learned model should beat); `random` (with --like
    HANDOFF): that architecture, randomly initialised with `seed` (what pretraining adds over
    nothing); a handoff directory: backbone features, no head; a finetune run directory or its
    `model/`: the finetuned embedding model.
    """
    if spec == "pixels":
        tf = T.Compose([T.Resize((16, 16), interpolation=T.InterpolationMode.BILINEAR, antialias=True),
                        T.ToTensor()])
        return Embedder(PixelEmbedder(), tf, "raw pixels 16x16, L2-normalised", {"kind": "pixels"})
    if spec == "random":
        if not like:
            raise BatonError("MODEL=random needs --like HANDOFF_DIR (the architecture to initialise)")
        torch.manual_seed(seed)
        backbone, backbone_meta = load_backbone(f"random:{like}")  # finetuning's backbone=random:DIR, the same init
        model = EmbeddingModel(backbone, backbone_meta.embedding_dim, None)
        return Embedder(model, build_transform(backbone_meta.preprocess),
                        f"random init (seed {seed}) of {backbone_meta.architecture or '?'} like {like}",
                        {"kind": "random", "like": str(like), "seed": seed, "backbone": backbone_meta.to_dict()})
    p = Path(spec)
    if not p.exists():
        raise BatonError(f"model path {p} does not exist: pass a finetune run directory, its model/, "
                         f"a backbone handoff directory, `random --like HANDOFF_DIR` or `pixels`")
    if find_model_dir(p) is not None:
        model, meta = load_embedding_model(p)
        return Embedder(model, build_transform(meta["preprocess"]), f"finetuned model {find_model_dir(p)}",
                        {"kind": "finetuned", **meta})
    if not (p / HANDOFF_META).is_file() and not p.name == HANDOFF_META:
        raise BatonError(f"{p} is neither a finetuned model (no {META}, nor model/{META}) nor a backbone "
                         f"handoff (no {HANDOFF_META}): pass a finetune run directory, a `baton export` "
                         f"directory, `random --like HANDOFF_DIR` or `pixels`")
    backbone, backbone_meta = load_backbone(p)
    model = EmbeddingModel(backbone, backbone_meta.embedding_dim, None)
    return Embedder(model, build_transform(backbone_meta.preprocess),
                    f"backbone {backbone_meta.architecture or '?'} from {p}",
                    {"kind": "backbone", "backbone": backbone_meta.to_dict()})
