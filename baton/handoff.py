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


def read_handoff(path: str | Path, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return (state_dict, meta) from a handoff directory; check presence and sha256."""
    d = Path(path)
    if d.is_file() and d.name in (WEIGHTS, META):
        d = d.parent
    meta_p, w_p = d / META, d / WEIGHTS
    if not meta_p.is_file() or not w_p.is_file():
        raise BatonError(f"no backbone handoff at {d}: expected {META} and {WEIGHTS} "
                         f"(create one with `baton export CHECKPOINT {d}`)")
    meta = json.loads(meta_p.read_text())
    if meta.get("format") != FORMAT:
        raise BatonError(f"{meta_p}: unknown handoff format {meta.get('format')!r}, expected {FORMAT!r}")
    if verify and meta.get("sha256") != sha256_file(w_p):
        raise BatonError(f"{w_p}: sha256 does not match {meta_p} (file changed or truncated); re-export it")
    return load_file(str(w_p)), meta
