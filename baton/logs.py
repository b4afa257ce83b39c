"""Logging for runs: a text log (`log.txt`), machine-readable scalars (`metrics.jsonl`),
tensorboard (`tb/`) and, when asked for and installed, Weights & Biases. Only rank 0 writes;
other ranks log warnings to stderr."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional

from baton.errors import BatonError

_FMT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def get_logger(name: str = "baton") -> logging.Logger:
    return logging.getLogger(name)


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to the `sys.stderr` of the moment, not the one there when the handler was made: a
    process that runs several stages (tests, notebooks, a caller that redirects stderr between
    them) would otherwise log a config warning of the next stage to a stream closed since."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(run_dir: str | Path | None = None, rank: int = 0) -> logging.Logger:
    root = logging.getLogger("baton")
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    for handler in root.handlers:   # a previous stage's in this process: its log file is closed
        handler.close()
    root.handlers.clear()
    root.propagate = False
    h = _CurrentStderrHandler()
    h.setFormatter(logging.Formatter(_FMT, "%H:%M:%S"))
    root.addHandler(h)
    if run_dir is not None and rank == 0:
        from baton.io import output_dir

        output_dir(run_dir, "run_dir")
        fh = logging.FileHandler(Path(run_dir) / "log.txt")
        fh.setFormatter(logging.Formatter(_FMT))
        root.addHandler(fh)
    return root


def wandb_run_id(run_dir: str | Path) -> str:
    """The wandb id of a run directory: its name plus a hash of its absolute path, so two runs
    whose directories share a name (runs/demo/pretrain, runs/demo-seed1/pretrain) never resume
    each other's wandb run, while a resumed run (the same directory) keeps its id."""
    import hashlib

    resolved = Path(run_dir).resolve()
    return f"{resolved.name}-{hashlib.sha1(str(resolved).encode()).hexdigest()[:8]}"


def end_partial_line(path: Path) -> None:
    """End a row a kill -9 cut short (no final newline) so the resumed run's first row is a line of
    its own, not glued to the broken one and lost with it (`read_metrics` skips the broken one)."""
    try:
        with open(path, "rb") as f:
            f.seek(-1, 2)
            last = f.read(1)
    except OSError:   # no file yet, or an empty one
        return
    if last != b"\n":
        with open(path, "ab") as f:
            f.write(b"\n")


class MetricsWriter:
    """Appends scalars to `metrics.jsonl` and tensorboard. A no-op on ranks other than 0."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 wandb_project: Optional[str] = None, config: Optional[dict] = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        if enabled and wandb_project:
            try:
                import wandb
            except ImportError:
                raise BatonError(f"wandb_project={wandb_project!r} is set but wandb is not installed: "
                                 f"`pip install wandb` (and `wandb login`), or unset it") from None
            # resume="allow" with an id of the run directory: a resumed run continues the same curve
            self._wandb = wandb.init(project=wandb_project, name=Path(run_dir).name, dir=str(run_dir),
                                     id=wandb_run_id(run_dir), resume="allow", config=config or {})
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            end_partial_line(self.path)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                    self._tb = SummaryWriter(str(Path(run_dir) / "tb"))
                except Exception:  # tensorboard missing: jsonl still written
                    self._tb = None

    def log(self, step: int, **scalars: Any) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": time.time(), **{k: float(v) for k, v in scalars.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, float(v), step)
        if self._wandb is not None:
            self._wandb.log({k: float(v) for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl ([] when there is none). A line that is not a json object (the
    row a kill -9 or a full disk cut short, bytes that are not UTF-8) is skipped with a warning
    naming the file and its line numbers, never a traceback that loses every other row."""
    p = Path(path)
    if not p.is_file():
        return []
    rows, bad = [], []
    for n, line in enumerate(p.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except ValueError:          # JSONDecodeError and UnicodeDecodeError
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad.append(n)
    if bad:
        get_logger().warning("%s: skipped %d line(s) that are not json objects (line %s)", p, len(bad),
                             ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else ""))
    return rows
