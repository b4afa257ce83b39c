"""timm's own files, both ways: released timm weights as a baton backbone, and a baton timm
export that timm itself loads.

Import (`backbone=timm:NAME`, `NAME` or `NAME.TAG` as timm names them): the model through
`timm.create_model(NAME, pretrained=True, num_classes=0)`, with the metadata a handoff has, so a
finetuned model saved from it rebuilds through `pretrain.backbones`. Without the hub the error
names the cache directory timm reads (the hub repository's, or torch hub's for URL weights).

Export: a timm handoff's `backbone.safetensors` already holds timm's own state-dict names (the
module is `timm.create_model(**model_config)`); `config.json` beside it is timm's hub config, so
either of these gives the exported network, with no baton code beyond registering baton's models:

    timm.create_model(NAME, pretrained=True, num_classes=0, **model_args,
                      pretrained_cfg_overlay=dict(file="OUT/backbone.safetensors"))
    timm.create_model("local-dir:OUT", pretrained=True)

Starting weights of a method's timm backbone (`dino.pretrained`, `glip.pretrained`): null (random
init) | `timm` (timm's released weights of the backbone) | a weights file timm loads; or timm's own
`pretrained` / `pretrained_cfg_overlay` in the section's backbone_kwargs. One rule for every method,
so a key accepted by one section means the same in the others, and none is silently dropped.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import nn

from baton.errors import BatonError
from baton.handoff import BackboneMeta, write_handoff
from baton.io import write_json_atomic
from pretrain.weight_cache import fill_hint, hf_repo_cache

TIMM_CONFIG = "config.json"  # the name timm's `local-dir:` and `hf-hub:` loaders read
# timm.create_model kwargs that choose starting weights: SECTION.pretrained's, never the handoff's model_config
WEIGHT_KWARGS = ("pretrained", "pretrained_cfg_overlay")


def timm_cache_place(name: str) -> tuple[str, str | None] | None:
    """(where timm reads NAME's released weights from, the hub repository or None), as timm's
    loader picks it: the hub repository when it has one, else the URL's torch hub file."""
    import timm
    import torch

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        repo = cfg.hf_hub_id.split("@")[0]
        return str(hf_repo_cache(repo)), repo
    if cfg.url:
        return f"{Path(torch.hub.get_dir()) / 'checkpoints' / Path(cfg.url).name} (from {cfg.url})", None
    return None


def load_timm_backbone(name: str, pretrained: bool = True) -> tuple[nn.Module, BackboneMeta]:
    """`backbone: timm:NAME`: a timm ImageNet model without its classifier (the published DML
    recipes' ResNet-50), weights through timm (its cache or the hub), with the same metadata a
    handoff has, so saved models rebuild through pretrain.backbones' timm builder."""
    import timm
    from timm.data import resolve_data_config

    from pretrain.models import register_timm_models

    register_timm_models()  # timm:NAME may be one of baton's small-image models
    if not timm.is_model(name.split(".")[0]):
        raise BatonError(f"backbone timm:{name}: timm has no model {name.split('.')[0]!r} "
                         f"(`timm.list_models(pretrained=True)` lists those with released weights)")
    try:
        module = timm.create_model(name, pretrained=pretrained, num_classes=0)
    except Exception as e:
        place = timm_cache_place(name) if pretrained else None
        where = fill_hint(*place) if place else "put the weights in timm's cache or use a `baton export` handoff"
        raise BatonError(f"backbone timm:{name}: cannot build it with pretrained weights "
                         f"({type(e).__name__}: {str(e)[:300]}); {where}") from None
    dc = resolve_data_config({}, model=module)
    meta = BackboneMeta(
        library="timm", architecture=name, tower="model", model_config={"model_name": name, "num_classes": 0},
        embedding_dim=int(module.num_features),
        preprocess={"image_size": int(dc["input_size"][-1]), "mean": [float(m) for m in dc["mean"]],
                    "std": [float(s) for s in dc["std"]], "interpolation": dc.get("interpolation", "bicubic")},
        source={"timm": name, "pretrained": pretrained})
    return module, meta


def write_timm_config(out: str | Path, model_config: dict[str, Any], preprocess: dict[str, Any]) -> Path:
    """Write timm's hub config (`config.json`: architecture, model_args, pretrained_cfg) for a timm
    handoff in OUT, so `timm.create_model('local-dir:OUT', pretrained=True)` rebuilds it."""
    args = copy.deepcopy(dict(model_config))
    name = args.pop("model_name")
    num_classes = int(args.pop("num_classes", 0))
    size = int(preprocess["image_size"])
    config = {"architecture": name, "num_classes": num_classes, "model_args": args,
              "pretrained_cfg": {"input_size": [3, size, size], "mean": list(preprocess["mean"]),
                                 "std": list(preprocess["std"]), "interpolation": preprocess["interpolation"],
                                 "crop_pct": 1.0, "crop_mode": "center", "num_classes": num_classes}}
    path = Path(out) / TIMM_CONFIG
    write_json_atomic(path, config)
    return path


def export_timm_backbone(out: str | Path, backbone: nn.Module, weights: dict[str, Any], where: str,
                         architecture: str, model_config: dict[str, Any], preprocess: dict[str, Any],
                         source: dict[str, Any]) -> Path:
    """Load `weights` into the freshly built timm `backbone` (a BatonError naming `where`, the config
    keys that built it, when they do not fit) and write it as a timm handoff in OUT: baton's
    backbone files plus timm's config.json, so finetuning, `timm.create_model('local-dir:OUT')` and
    `pretrained_cfg_overlay=dict(file=...)` all load it. The handoff's `embedding_dim` is the
    backbone's own `num_features`."""
    try:
        backbone.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise BatonError(f"the checkpoint's backbone does not match {where}: {e}") from None
    meta = BackboneMeta(library="timm", architecture=architecture, model_config=model_config, tower="model",
                        embedding_dim=int(backbone.num_features), preprocess=preprocess, source=source)
    write_handoff(out, backbone.state_dict(), meta)
    write_timm_config(out, meta.model_config, meta.preprocess)
    return Path(out)


def architecture_kwargs(section: str, backbone: str, backbone_kwargs: Any) -> dict[str, Any]:
    """The `timm.create_model` kwargs of SECTION's backbone architecture (also the handoff's
    model_config): SECTION.backbone_kwargs without the weight-choosing keys."""
    if not isinstance(backbone_kwargs or {}, dict):
        raise BatonError(f"{section}.backbone_kwargs must be a mapping of timm.create_model kwargs, "
                         f"not {backbone_kwargs!r}")
    nulls = [k for k, v in (backbone_kwargs or {}).items() if v is None]
    if nulls:  # timm.create_model drops None-valued kwargs: the key would silently do nothing
        raise BatonError(f"{section}.backbone_kwargs.{nulls[0]} is null, and timm ignores null kwargs; give it a "
                         f"value (in YAML flow style a space after the colon: {{grid: 1}}, not {{grid:1}})")
    kwargs = {k: v for k, v in dict(backbone_kwargs or {}).items() if k not in WEIGHT_KWARGS}
    return {"model_name": backbone, "num_classes": 0, **kwargs}


def start_weights(section: str, pretrained: str | None, backbone_kwargs: Any) -> dict[str, Any]:
    """`pretrained=` / `pretrained_cfg_overlay=` for timm from SECTION.pretrained; the same keys given
    in SECTION.backbone_kwargs take effect as timm reads them (an overlay file implies pretrained=True)."""
    given = {k: v for k, v in dict(backbone_kwargs or {}).items() if k in WEIGHT_KWARGS}
    if pretrained and given:
        raise BatonError(f"{section}.pretrained={pretrained!r} and {section}.backbone_kwargs {sorted(given)} both "
                         f"choose the starting weights: keep one")
    if given:
        return {"pretrained": bool(given.get("pretrained", True)), **given}
    if not pretrained:
        return {"pretrained": False}
    if pretrained == "timm":
        return {"pretrained": True}
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise BatonError(f"{section}.pretrained={pretrained!r}: no such weights file; give a .safetensors / .pth "
                         f"timm loads (e.g. a baton export's backbone.safetensors), `timm` for timm's released "
                         f"weights of {section}.backbone, or null for a random init")
    return {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path.resolve())}}


def create_backbone(section: str, backbone: str, backbone_kwargs: Any, pretrained: str | None,
                    weights: bool = True, **extra: Any) -> nn.Module:
    """SECTION's timm backbone (num_classes=0) with its starting weights, or a random init when not
    `weights` (a module that a checkpoint or an export fills next: no download, no weights file
    needed). timm's failures become one error naming the section's keys and, for released weights,
    the cache to fill."""
    import timm

    from pretrain.models import register_timm_models

    register_timm_models()
    kwargs = {**architecture_kwargs(section, backbone, backbone_kwargs), **extra}
    chosen = start_weights(section, pretrained, backbone_kwargs) if weights else {"pretrained": False}
    try:
        return timm.create_model(**kwargs, **chosen)
    except Exception as e:  # unknown name (RuntimeError), kwargs the model does not take (TypeError), no weights
        where = ""
        if chosen["pretrained"] and "pretrained_cfg_overlay" not in chosen:
            place = timm_cache_place(backbone)
            where = f"; {fill_hint(*place)}" if place else f"; timm has no released weights for {backbone}"
        raise BatonError(f"{section}.backbone={backbone!r} with {section}.backbone_kwargs={backbone_kwargs}"
                         f"{f' and {section}.pretrained={pretrained!r}' if pretrained else ''}: "
                         f"timm cannot build it: {type(e).__name__}: {str(e)[:400]}{where}") from None
