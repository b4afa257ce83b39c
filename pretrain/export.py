"""`baton export CHECKPOINT OUT`: write a pretrain checkpoint's image tower as a backbone handoff.

The weights keep open_clip's `model.visual` state-dict names, so `open_clip`'s own model loads
them with `model.visual.load_state_dict`; the metadata carries the full open_clip config, so
`pretrain.backbones.build_backbone` rebuilds the tower without this run or its YAML.

Beside it goes the text tower, `text_tower.safetensors`: every weight of the CLIP model outside
`visual.*` (open_clip's names, logit_scale included), so finetuning can embed class names with
the very text encoder the image tower was aligned to (language guidance), or build the zero-shot
classifier. backbone.json describes it under `text` (weights file, sha256, tokenizer, context
length); readers that do not know the key ignore it, so the handoff stays backward compatible.
"""

from __future__ import annotations

from pathlib import Path

from baton.checkpoint import load_checkpoint
from baton.config import from_yaml
from baton.errors import BatonError
from baton.handoff import sha256_file, write_handoff
from baton.io import atomic_path
from pretrain.clip.model import build_clip, model_config_dict, preprocess_cfg

TEXT_WEIGHTS = "text_tower.safetensors"


def write_text_tower(out: Path, model, model_config: dict) -> dict:
    """Write the non-visual weights to OUT/text_tower.safetensors; return backbone.json's `text` entry."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()
               if not k.startswith("visual.")}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / TEXT_WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
    text_cfg = model_config.get("text_cfg", {})
    return {"weights": TEXT_WEIGHTS, "sha256": sha256_file(out / TEXT_WEIGHTS),
            "tokenizer": text_cfg.get("hf_tokenizer_name") or "open_clip-simple",
            "context_length": int(text_cfg.get("context_length", 77))}
from pretrain.config import PretrainConfig

USAGE = ("usage: baton export CHECKPOINT OUT\n"
         "  CHECKPOINT: a pretrain run directory, its checkpoints/ directory or a step directory\n"
         "  OUT: directory to write backbone.safetensors and backbone.json into")


def export(checkpoint: str | Path, out: str | Path) -> Path:
    """Export and return OUT. Raises BatonError when the checkpoint is missing or not a CLIP run."""
    state, meta = load_checkpoint(checkpoint)
    if "config" not in state or "model" not in state:
        raise BatonError(f"{meta['path']} is not a `baton pretrain` checkpoint (no model/config in its state)")
    cfg = from_yaml(PretrainConfig, state["config"])
    model_config = model_config_dict(cfg.model)
    tag, cfg.model.pretrained = cfg.model.pretrained, None  # the checkpoint has the weights: no download
    model = build_clip(cfg.model)
    model.load_state_dict(state["model"], strict=True)
    preprocess = preprocess_cfg(model)
    if tag:  # training used the pretrained tag's normalisation
        import open_clip
        tag_cfg = open_clip.get_pretrained_cfg(cfg.model.name, tag) or {}
        preprocess.update({k: list(tag_cfg[k]) for k in ("mean", "std") if k in tag_cfg})
        preprocess["interpolation"] = tag_cfg.get("interpolation", preprocess["interpolation"])
    handoff_meta = {
        "library": "open_clip",
        "architecture": cfg.model.name,
        "model_config": model_config,
        "tower": "visual",
        "embedding_dim": int(model_config["embed_dim"]),
        "preprocess": preprocess,
        "source": {"checkpoint": str(Path(meta["path"]).resolve()), "step": int(state["step"]), "method": "clip"},
        "text": write_text_tower(Path(out), model, model_config),
    }
    return write_handoff(out, model.visual.state_dict(), handoff_meta)


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    if len(argv) != 2:
        raise BatonError(f"expected CHECKPOINT OUT, got {len(argv)} argument(s)\n{USAGE}")
    out = export(argv[0], argv[1])
    print(f"wrote {out / 'backbone.safetensors'}, {out / TEXT_WEIGHTS} and {out / 'backbone.json'}")
    return 0
