"""The handoff: the only thing finetuning reads from pretraining.

`OUT/backbone.safetensors` holds the image backbone's weights (its own state-dict names, so the
module that produced them loads them back with `load_state_dict`); `OUT/backbone.json` says how
to rebuild that module and how to feed it:

    {
      "format": "baton-backbone/1",
      "library": "open_clip",            # who builds the module: open_clip | timm
      "architecture": "baton-tiny-vit",  # model name in that library
      "model_config": {...},             # open_clip model config dict (or timm kwargs)
      "tower": "visual",                 # which submodule of the model the weights belong to
      "embedding_dim": 128,              # width of the backbone's output
      "preprocess": {"image_size": 64, "mean": [...], "std": [...], "interpolation": "bicubic"},
      "source": {"checkpoint": "...", "step": 500, "method": "clip"},
      "sha256": "..."                    # of backbone.safetensors
    }
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from baton.errors import BatonError
from baton.io import atomic_path, write_json_atomic

WEIGHTS = "backbone.safetensors"
META = "backbone.json"
FORMAT = "baton-backbone/1"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_handoff(out_dir: str | Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write the weights then the metadata (with the weights' sha256), each atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic_path(out / WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
    full = {"format": FORMAT, **meta, "sha256": sha256_file(out / WEIGHTS)}
    write_json_atomic(out / META, full)
    return out


def foreign_checkpoint_hint(path: str | Path) -> str | None:
    """How to use `path` when it is an open_clip / open_clip_train checkpoint or an open_clip local
    directory (which `baton export`, a converter of baton pretrain runs, does not read); else None."""
    p = Path(path)
    if (p / "open_clip_config.json").is_file():
        return f"an open_clip local directory: use backbone=open_clip:local-dir:{p}"
    if p.is_dir():  # open_clip_train's logs/NAME/ or its checkpoints/: the newest epoch_N.pt
        numbered = [f for f in [*p.glob("epoch_*.pt"), *p.glob("checkpoints/epoch_*.pt")] if f.stem[6:].isdigit()]
        files = sorted(numbered, key=lambda f: int(f.stem[6:]))
    else:
        files = [p] if p.is_file() and p.suffix in (".pt", ".pth", ".bin", ".safetensors") else []
    if not files or files[-1].name == "state.pt":  # state.pt: a baton checkpoint's own file
        return None
    return (f"{files[-1]} looks like an open_clip / open_clip_train checkpoint: use it as it is with "
            f"backbone=open_clip:MODEL@{files[-1]} (MODEL: its open_clip model name or config .json; "
            f"open_clip:{files[-1]} reads the model from open_clip_train's params.txt)")


def read_handoff(path: str | Path, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return (state_dict, meta) from a handoff directory; check presence and sha256."""
    d = Path(path)
    if d.is_file() and d.name in (WEIGHTS, META):
        d = d.parent
    meta_p, w_p = d / META, d / WEIGHTS
    if not meta_p.is_file() or not w_p.is_file():
        foreign = foreign_checkpoint_hint(d)
        raise BatonError(f"no backbone handoff at {d}: expected {META} and {WEIGHTS} "
                         f"({foreign or f'create one from a baton pretrain run with `baton export RUN {d}`'})")
    meta = json.loads(meta_p.read_text())
    if meta.get("format") != FORMAT:
        raise BatonError(f"{meta_p}: unknown handoff format {meta.get('format')!r}, expected {FORMAT!r}")
    if verify and meta.get("sha256") != sha256_file(w_p):
        raise BatonError(f"{w_p}: sha256 does not match {meta_p} (file changed or truncated); re-export it")
    return load_file(str(w_p)), meta
