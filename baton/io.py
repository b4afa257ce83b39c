"""Atomic writes: output is written under a temporary name and renamed into place, so a crash
never leaves a half-written file where a complete one is expected."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from baton.errors import BatonError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`.

    Works for files and directories. On error the temporary is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)
    tmp = Path(tmp)
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def output_dir(path: str | os.PathLike, what: str, create: bool = True) -> Path:
    """The output directory `path`, created if missing (`create=False`: only checked, so that a run
    refused later leaves nothing behind), before any work is done for it; BatonError naming `what`
    (the flag or key that set it) when it cannot be one (a file is there or above it, no
    permission), instead of a traceback after the work."""
    path = Path(path)
    if not create:
        if path.exists() and not path.is_dir():
            raise BatonError(f"{what} {path} exists and is not a directory; pass a directory")
        above = path
        while not above.exists() and above != above.parent:
            above = above.parent
        if not above.is_dir():
            raise BatonError(f"{what} {path}: cannot create the directory ({above} is not a directory); "
                             f"pass another one")
        if not os.access(above, os.W_OK | os.X_OK):
            raise BatonError(f"{what} {path}: cannot create the directory (no permission in {above}); "
                             f"pass another one")
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise BatonError(f"{what} {path} exists and is not a directory; pass a directory") from None
    except OSError as e:
        raise BatonError(f"{what} {path}: cannot create the directory ({e.strerror or e}); pass another one") from None
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def seconds_from_env(name: str, default: float) -> float:
    """A time limit in seconds from environment variable `name` (default when unset); it reaches
    worker processes and every rank through the environment. Not a number > 0: a BatonError."""
    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        value = -1.0
    if not value > 0:
        raise BatonError(f"{name}={raw!r}: expected a number of seconds > 0")
    return value
