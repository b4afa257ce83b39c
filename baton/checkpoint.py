"""Checkpoint I/O: atomic step directories, a `latest` pointer, the last N kept.

Layout of a run's `checkpoints/` folder::

    step_000500/state.pt     torch.save of a dict of tensors and plain Python values
    step_000500/meta.json    step, epoch, config hash and anything human-readable
    latest                   text file holding the name of the newest complete step directory

A step directory is written under a temporary name and renamed, then `latest` is replaced
atomically, so an interrupted save leaves the previous checkpoint intact. Loading uses
`torch.load(weights_only=True)`: nothing is unpickled beyond tensors and plain containers.

Sharded checkpoints (several ranks writing one step directory, e.g. torch.distributed.checkpoint
or DeepSpeed files beside `state.pt`) use the same protocol in three calls: rank 0
`open_step_dir` (a fresh temporary directory with a name every rank can compute), every rank
writes into `tmp_step_dir(...)`, then rank 0 `publish_step_dir` (rename, `latest`, prune), with
barriers in between.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from baton.errors import BatonError
from baton.io import atomic_path, write_text_atomic

STATE_FILE = "state.pt"
META_FILE = "meta.json"
LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def save_checkpoint(ckpt_root: str | Path, step: int, state: dict[str, Any],
                    meta: dict[str, Any] | None = None, keep_last: int = 3) -> Path:
    """Write `state` (tensors / plain values) as checkpoint `step`, update `latest`, prune old ones."""
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / step_dir_name(step)
    with atomic_path(final) as tmp:
        tmp.mkdir(parents=True)
        torch.save(state, tmp / STATE_FILE)
        (tmp / META_FILE).write_text(json.dumps({"step": step, **(meta or {})}, indent=2))
    _point_and_prune(ckpt_root, final, keep_last)
    return final


def _point_and_prune(ckpt_root: Path, final: Path, keep_last: int) -> None:
    write_text_atomic(ckpt_root / LATEST, final.name + "\n")
    if keep_last > 0:
        steps = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
        for old in steps[:-keep_last]:
            if old.name != final.name:
                shutil.rmtree(old, ignore_errors=True)


def tmp_step_dir(ckpt_root: str | Path, step: int) -> Path:
    """The temporary directory that every rank writes step `step` into (same name on every rank)."""
    return Path(ckpt_root) / f".{step_dir_name(step)}.tmp"


def open_step_dir(ckpt_root: str | Path, step: int) -> Path:
    """Rank 0, before the ranks write: an empty `tmp_step_dir` (leftovers of a crashed save removed)."""
    tmp = tmp_step_dir(ckpt_root, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish_step_dir(ckpt_root: str | Path, step: int, state: dict[str, Any], meta: dict[str, Any] | None = None,
                     keep_last: int = 3) -> Path:
    """Rank 0, after every rank wrote its files into `tmp_step_dir`: add `state.pt` and `meta.json`,
    rename the directory into place, point `latest` at it and prune old checkpoints."""
    ckpt_root = Path(ckpt_root)
    tmp, final = tmp_step_dir(ckpt_root, step), ckpt_root / step_dir_name(step)
    torch.save(state, tmp / STATE_FILE)
    (tmp / META_FILE).write_text(json.dumps({"step": step, **(meta or {})}, indent=2))
    if final.exists():  # a rerun of the same step (resumed before its pointer moved): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _point_and_prune(ckpt_root, final, keep_last)
    return final


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a step directory, a `checkpoints/` folder, a run directory or `.../latest`.

    Returns the step directory. Raises `BatonError` naming what was looked for.
    """
    p = Path(path)
    candidates = [p, p / "checkpoints"]
    if p.name == LATEST:
        candidates = [p.parent]
    for c in candidates:
        if (c / STATE_FILE).is_file():
            return c
        latest = c / LATEST
        if latest.is_file():
            target = c / latest.read_text().strip()
            if (target / STATE_FILE).is_file():
                return target
            raise BatonError(f"checkpoint pointer {latest} names {target}, which has no {STATE_FILE}; "
                             f"delete the pointer or pass a step directory explicitly")
    raise BatonError(f"no checkpoint found at {p}: expected a step directory containing {STATE_FILE}, "
                     f"or a run/checkpoints directory with a '{LATEST}' pointer "
                     f"(train first, or check the path)")


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The newest complete checkpoint under `ckpt_root`, or None if there is none yet."""
    try:
        return resolve_checkpoint(ckpt_root)
    except BatonError:
        return None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Load (state, meta) from a checkpoint path accepted by `resolve_checkpoint`."""
    d = resolve_checkpoint(path)
    state = torch.load(d / STATE_FILE, map_location=map_location, weights_only=True)
    meta = json.loads((d / META_FILE).read_text()) if (d / META_FILE).is_file() else {}
    meta["path"] = str(d)
    return state, meta
