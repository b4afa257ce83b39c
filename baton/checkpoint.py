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

import errno
import json
import logging
import os
import shutil
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from baton.errors import BatonError
from baton.io import atomic_path, write_text_atomic

STATE_FILE = "state.pt"
META_FILE = "meta.json"
LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


@contextmanager
def writing_step(ckpt_root: str | Path, step: int) -> Iterator[None]:
    """Around the writing of checkpoint `step`: if it fails (a full disk, a quota, a vanished
    mount), its temporary directory is removed, so a failed save does not go on filling the disk,
    and the error says why, how much room is left and which checkpoint is the last good one."""
    ckpt_root = Path(ckpt_root)
    try:
        yield
    except Exception as e:
        shutil.rmtree(tmp_step_dir(ckpt_root, step), ignore_errors=True)
        text = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
        try:
            free_bytes = shutil.disk_usage(ckpt_root).free
            free = f"{free_bytes / 2 ** 20:.0f} MiB free"
        except OSError:
            free_bytes, free = None, "free space unknown"
        # torch.save reports a full disk only as "file write failed": that counts as full when the
        # device is (nearly) full now, not for every write error
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e) \
            or ("file write failed" in str(e) and free_bytes is not None and free_bytes < 2 ** 26)
        good = latest_checkpoint(ckpt_root) if ckpt_root.is_dir() else None
        why = f"no space left on the device of {ckpt_root} ({free})" if full else f"{text} ({free})"
        raise BatonError(f"writing checkpoint step {step} failed: {why}; nothing of it is left behind. "
                         f"The last good checkpoint is {good.name if good else 'none'}: make room and continue "
                         f"with resume=latest") from None


def save_checkpoint(ckpt_root: str | Path, step: int, state: dict[str, Any],
                    meta: dict[str, Any] | None = None, keep_last: int = 3) -> Path:
    """Write `state` (tensors / plain values) as checkpoint `step`, update `latest`, prune old ones."""
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / step_dir_name(step)
    with writing_step(ckpt_root, step), atomic_path(final) as tmp:
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
    with writing_step(ckpt_root, step):
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
        if (c / LATEST).is_file() or step_dirs(c):
            found = latest_checkpoint(c)  # the pointer's step, else the newest intact one
            if found is not None:
                return found
    raise BatonError(f"no checkpoint found at {p}: expected a step directory containing {STATE_FILE}, "
                     f"or a run/checkpoints directory with a '{LATEST}' pointer "
                     f"(train first, or check the path)")


def is_intact(step_dir: Path) -> bool:
    """Whether `step_dir/state.pt` is a whole torch file: torch.save writes a zip archive whose
    directory comes last, so a file cut short (a full disk, a kill during a copy) does not open."""
    try:
        with zipfile.ZipFile(step_dir / STATE_FILE):
            return True
    except (OSError, zipfile.BadZipFile):
        return False


def step_dirs(ckpt_root: str | Path) -> list[Path]:
    """The published step directories under `ckpt_root`, oldest first (temporary ones excluded)."""
    return sorted(p for p in Path(ckpt_root).glob("step_*") if p.is_dir())


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The newest intact checkpoint under `ckpt_root`, or None if it holds no step directory.

    The `latest` pointer is followed when it names an intact step; when it is missing, dangling or
    names a damaged `state.pt`, the newest intact step directory is taken instead (with a warning),
    so `resume=latest` never silently starts again from step 0 over good checkpoints. Step
    directories of which none is intact are an error, not a fresh start."""
    root = Path(ckpt_root)
    pointer = root / LATEST
    named = root / pointer.read_text().strip() if pointer.is_file() else None
    if named is not None and named.name and is_intact(named):
        return named
    dirs = step_dirs(root)
    if not dirs:
        return None
    for d in reversed(dirs):
        if is_intact(d):
            why = f"{pointer} names {named.name}, which is missing or damaged" if named is not None \
                else f"{pointer} is missing"
            logging.getLogger("baton").warning("%s: resuming from %s, the newest intact step", why, d)
            return d
    raise BatonError(f"{root}: no intact checkpoint ({', '.join(d.name for d in dirs)}: each {STATE_FILE} is "
                     f"missing or truncated); move {root} away to start afresh, or pass resume=PATH")


def refuse_used_run_dir(ckpt_root: str | Path) -> None:
    """A run started without `resume` must not write over a run directory that has checkpoints."""
    if step_dirs(ckpt_root) or (Path(ckpt_root) / LATEST).exists():
        raise BatonError(f"{ckpt_root} already has checkpoints: pass resume=latest to continue that run, "
                         f"or choose a fresh run_dir=")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Load (state, meta) from a checkpoint path accepted by `resolve_checkpoint`. A file that is
    not a whole checkpoint of tensors and plain values is refused, naming it; nothing in it runs."""
    d = resolve_checkpoint(path)
    try:
        state = torch.load(d / STATE_FILE, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip (RuntimeError), pickled code refused (UnpicklingError), ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BatonError(f"{d / STATE_FILE}: refused, not a whole baton checkpoint of tensors and plain "
                         f"values ({type(e).__name__}: {first[:200]}); resume from an earlier step "
                         f"directory (resume=PATH) or start a fresh run_dir=") from None
    meta = json.loads((d / META_FILE).read_text()) if (d / META_FILE).is_file() else {}
    meta["path"] = str(d)
    return state, meta
