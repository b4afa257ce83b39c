"""`glip.init_from`: start GLIP's encoders from a baton handoff (`baton export` of a CLIP run, or a timm
handoff of a DINO / GLIP run) instead of a random init, as GLIP starts from pretrained towers.

`glip.init_towers` says which encoders are loaded, and each one listed must load or the run stops
before training, naming what differs (a tower silently left at random init would look like a
working initialisation):

- `image`: the handoff's image tower into `GlipModel.backbone` (timm, `glip.backbone`). A CLIP's image
  tower must be open_clip's timm adapter (`vision_cfg.timm_model_name`) of the same timm model: its
  `trunk.*` weights are that model's own (open_clip builds the trunk with num_classes=0, as GLIP does);
  a timm handoff's weights are the model's directly (`model_config.model_name`). Every backbone
  weight must come from the handoff with its shape (the projection head of the CLIP is not used).
- `text`: a CLIP's transformers text tower (`text_cfg.hf_model_name`, in `text_tower.safetensors` as
  `text.transformer.*`) into `glip.text_encoder=hf` of the same `glip.text_model`. The tokenizer has
  to be that model's: GLIP maps character spans to tokens with a fast HF tokenizer, so a CLIP text
  tower over open_clip's own BPE cannot be reused. The HF pooler is the one weight GLIP may keep
  from `glip.text_model` (open_clip drops it when it mean-pools; GLIP reads per-token features only).

On `resume`, the checkpoint replaces all of this (the engine loads it after `build_model`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from baton.errors import BatonError
from baton.handoff import BackboneMeta, read_handoff, read_text_tower
from baton.registry import Registry, unknown_name

TOWERS = ("image", "text")
TRUNK = "trunk."
HF_TEXT = "text.transformer."
UNUSED_TEXT = ("pooler.",)       # GLIP keeps these from glip.text_model when the CLIP has none


def check_towers(towers) -> list[str]:
    towers = list(towers or [])
    bad = [t for t in towers if t not in TOWERS]
    if bad or not towers:
        raise BatonError(f"glip.init_towers={towers}: choose one or both of {', '.join(TOWERS)}")
    return towers


def load_exact(module: nn.Module, weights: dict[str, torch.Tensor], what: str, may_keep: tuple[str, ...] = ()) -> None:
    """Copy `weights` into `module`: the same names and shapes, every module weight covered (except
    names starting with `may_keep`), else a BatonError listing what differs."""
    own = module.state_dict()
    missing = sorted(k for k in own if k not in weights and not k.startswith(may_keep))
    extra = sorted(k for k in weights if k not in own)
    shapes = sorted(f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}" for k in weights
                    if k in own and weights[k].shape != own[k].shape)
    if missing or extra or shapes:
        parts = [f"{label} ({len(v)}): {', '.join(v[:4])}{', ...' if len(v) > 4 else ''}"
                 for label, v in (("not in the handoff", missing), ("not in GLIP's", extra),
                                  ("shape handoff vs GLIP", shapes)) if v]
        raise BatonError(f"{what}: the weights do not fit; {'; '.join(parts)}")
    module.load_state_dict(weights, strict=False)


def _timm_image(state: dict[str, torch.Tensor], meta: BackboneMeta, backbone: str,
                where: str) -> dict[str, torch.Tensor]:
    """A timm handoff (DINO / GLIP): its weights are the model's own."""
    name = meta.model_config.get("model_name")
    if name != backbone:
        raise BatonError(f"{where}: its image tower is timm '{name}', but glip.backbone={backbone}; set "
                         f"glip.backbone={name} or leave 'image' out of glip.init_towers")
    return state


def _open_clip_image(state: dict[str, torch.Tensor], meta: BackboneMeta, backbone: str,
                     where: str) -> dict[str, torch.Tensor]:
    """A CLIP handoff: only open_clip's timm adapter has a timm model's weights (its `trunk.*`)."""
    vision = meta.model_config.get("vision_cfg", {})
    name = vision.get("timm_model_name")
    if name is None:
        raise BatonError(f"{where}: its image tower is open_clip's own (vision_cfg without timm_model_name: "
                         f"{sorted(vision)}), not a timm model, and GLIP's backbone is timm "
                         f"glip.backbone={backbone}; leave 'image' out of glip.init_towers")
    if name != backbone:
        raise BatonError(f"{where}: its image tower is timm '{name}' (vision_cfg.timm_model_name), but "
                         f"glip.backbone={backbone}; set glip.backbone={name} or leave 'image' out of glip.init_towers")
    return {k[len(TRUNK):]: v for k, v in state.items() if k.startswith(TRUNK)}


# handoff library (`BUILDERS` in pretrain/backbones.py) -> its image tower's timm weights; a library
# left out here still rebuilds in later stages, GLIP just cannot start from it
IMAGE_TOWERS = Registry("handoff library", {"timm": _timm_image, "open_clip": _open_clip_image})


def image_weights(state: dict[str, torch.Tensor], meta: BackboneMeta, backbone: str,
                  where: str) -> dict[str, torch.Tensor]:
    """The timm model's own weights of the handoff's image tower, if it is timm model `backbone`."""
    if meta.library not in IMAGE_TOWERS:
        raise unknown_name("handoff library", meta.library, IMAGE_TOWERS,
                           f" (of {where}: the handoffs glip.init_from reads)")
    return IMAGE_TOWERS[meta.library](state, meta, backbone, where)


def text_weights(path: Path, meta: BackboneMeta, glip, where: str) -> dict[str, torch.Tensor]:
    """The transformers model's weights of a CLIP handoff's text tower, if it is `glip.text_model`."""
    if meta.library != "open_clip" or meta.text is None:
        raise BatonError(f"{where}: no text tower (only a CLIP export has text_tower.safetensors); "
                         f"leave 'text' out of glip.init_towers")
    text_cfg = meta.model_config.get("text_cfg", {})
    hf = text_cfg.get("hf_model_name")
    if hf is None:
        raise BatonError(f"{where}: its text tower is open_clip's own transformer over tokenizer "
                         f"'{meta.text.tokenizer}', and GLIP needs a fast HF tokenizer (glip.text_model) to "
                         f"map phrases to tokens; only a CLIP text tower that is a transformers model "
                         f"(text_cfg.hf_model_name) loads; leave 'text' out of glip.init_towers")
    if glip.text_encoder != "hf" or glip.text_model != hf:
        raise BatonError(f"{where}: its text tower is the transformers model '{hf}', but glip.text_encoder="
                         f"{glip.text_encoder} glip.text_model={glip.text_model}; set glip.text_encoder=hf "
                         f"glip.text_model={hf} or leave 'text' out of glip.init_towers")
    state, _ = read_text_tower(path, meta)     # its sha256 checked
    return {k[len(HF_TEXT):]: v for k, v in state.items() if k.startswith(HF_TEXT)}


@torch.no_grad()
def init_from_handoff(model: nn.Module, glip) -> None:
    """Load `glip.init_towers` of the handoff `glip.init_from` into a GlipModel, in place."""
    path = Path(glip.init_from)
    towers = check_towers(glip.init_towers)
    where = f"glip.init_from={path}"
    state, meta = read_handoff(path)
    if "image" in towers:
        load_exact(model.backbone, image_weights(state, meta, glip.backbone, where),
                   f"{where} image tower -> glip.backbone={glip.backbone} {glip.backbone_kwargs or {}}")
    if "text" in towers:
        load_exact(model.text.net, text_weights(path, meta, glip, where),
                   f"{where} text tower -> glip.text_model={glip.text_model}", may_keep=UNUSED_TEXT)
