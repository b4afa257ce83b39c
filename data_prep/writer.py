"""The one shard writer every source uses: samples in, `shard-NNNNNN.tar` + `stats.json` out.

Contract (docs/architecture.md): shards `shard-000000.tar`, ... (`shard-000000-000.tar`, ... when
split by bytes) in one directory, `stats.json` beside them with `num_samples`, `shards`
[{name, count, bytes}], `written`, `skipped` {reason: count}, `bytes`, `inputs` and (unless
turned off) `throughput`. Each shard is written under a temporary name and renamed only when
complete, and `stats.json` is removed first and written last (atomically), so a directory with a
`stats.json` is always a complete, consistent set; an interrupted run never leaves a partial
`shard-*.tar`. Tar headers use a fixed mtime/owner, so the same samples give byte-identical
shards. How inputs are cut into shards, in parallel and resumably (and `write_shards`, the
serial entry point): data_prep/job.py.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import tarfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import webdataset as wds

from baton.io import atomic_path

SHARD_PATTERN = "shard-{:06d}.tar"
STATS = "stats.json"
SIZES = "sizes.json"   # {shard file name: samples}: what open_clip_train reads for --train-num-samples
# Fixed tar header fields: reproducible bytes whatever the clock or user.
TAR_MTIME = 0  # an int: a float mtime makes tarfile add a PAX header to every member
TAR_USER = "baton"
MAX_KEY_LEN = 80  # USTAR names are limited to 100 bytes including ".json"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass
class Sample:
    """One image-text pair. `key` may be any string: the writer makes it tar/webdataset safe."""

    key: str
    image: bytes
    ext: str  # "png" or "jpg"
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)  # goes to key.json ("class", "captions", ...)


@dataclass
class Skip:
    """An input that was not written; counted under `reason` in stats.json."""

    reason: str
    where: str = ""


def safe_key(raw: str) -> str:
    """A key webdataset and tar accept: no dots (webdataset splits key/extension at the first
    dot), no slashes, ASCII only, bounded length (a hash keeps truncated keys distinct)."""
    key = _UNSAFE.sub("_", raw).strip("_") or "sample"
    if len(key) > MAX_KEY_LEN:
        digest = hashlib.sha1(raw.encode("utf-8")).hexdigest()[:10]
        key = f"{key[:MAX_KEY_LEN - 11]}_{digest}"
    return key


class Keys:
    """Hands out unique safe keys; a repeated key gets a numeric suffix rather than being lost."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def unique(self, raw: str) -> str:
        base = safe_key(raw)
        key, n = base, 1
        while key in self.seen:
            n += 1
            key = f"{base}-{n}"
        self.seen.add(key)
        return key


def _encode(sample: Sample, key: str) -> dict[str, bytes | str]:
    if sample.ext not in ("png", "jpg"):
        raise ValueError(f"sample {sample.key!r}: image extension must be png or jpg, not {sample.ext!r}")
    meta = json.dumps(sample.meta, ensure_ascii=False, sort_keys=True)
    return {"__key__": key, sample.ext: bytes(sample.image),
            "txt": sample.caption.encode("utf-8"), "json": meta.encode("utf-8")}


def tar_entry_bytes(sample: Sample) -> int:
    """Bytes `sample` adds to a shard: each member's header(s) as tarfile writes them for
    webdataset.TarWriter (pax records included) plus its data padded to 512 bytes."""
    total = 0
    for name, data in _encode(sample, sample.key).items():
        if name == "__key__":
            continue
        ti = tarfile.TarInfo(f"{sample.key}.{name}")
        ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = len(data), TAR_MTIME, 0o444, TAR_USER, TAR_USER
        total += len(ti.tobuf(tarfile.DEFAULT_FORMAT, tarfile.ENCODING, "surrogateescape"))
        total += -(-len(data) // 512) * 512
    return total


def tar_file_bytes(entries: int) -> int:
    """Size of a tar holding `entries` bytes of members: end blocks, padded to 10240-byte records."""
    return -(-(entries + 1024) // 10240) * 10240


def shard_name(index: int, piece: int | None = None) -> str:
    """`shard-000007.tar`, or `shard-000007-002.tar` when --shard-max-bytes splits shards."""
    return SHARD_PATTERN.format(index) if piece is None else f"shard-{index:06d}-{piece:03d}.tar"


class ShardFiles:
    """Writes the samples of input chunk `index` into one shard, or into pieces of at most
    `max_bytes` (a sample larger than that gets a piece of its own). Each file is written under
    a temporary name and renamed when complete (baton.io.atomic_path); `shards` lists them."""

    def __init__(self, out: Path, index: int, max_bytes: int | None = None) -> None:
        self.out, self.index, self.max_bytes = out, index, max_bytes
        self.shards: list[dict[str, Any]] = []
        self._stack: ExitStack | None = None
        self._tw = None
        self._count = self._entries = 0

    def add(self, sample: Sample) -> None:
        size = tar_entry_bytes(sample)
        if self._tw is not None and self.max_bytes is not None and self._count and \
                tar_file_bytes(self._entries + size) > self.max_bytes:
            self._finish()
        if self._tw is None:
            self._open()
        self._tw.write(_encode(sample, sample.key))
        self._count += 1
        self._entries += size

    def _open(self) -> None:
        piece = None if self.max_bytes is None else len(self.shards)
        name = shard_name(self.index, piece)
        self._stack = ExitStack()
        tmp = self._stack.enter_context(atomic_path(self.out / name))
        f = self._stack.enter_context(open(tmp, "wb"))
        self._tw = wds.TarWriter(f, user=TAR_USER, group=TAR_USER, encoder=False, mtime=TAR_MTIME)
        self.shards.append({"name": name, "count": 0, "bytes": 0})

    def _finish(self) -> None:
        self._tw.close()
        self._tw = None
        self._stack.close()  # closes the file, then renames it into place
        path = self.out / self.shards[-1]["name"]
        self.shards[-1].update(count=self._count, bytes=path.stat().st_size)
        self._count = self._entries = 0

    def close(self) -> list[dict[str, Any]]:
        if self._tw is not None:
            self._finish()
        return self.shards

    def abort(self) -> None:
        """Drop the unfinished piece (its temporary file); finished pieces stay."""
        if self._stack is not None and self._tw is not None:
            self._tw = None
            self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)
            self.shards.pop()


def read_stats(out_dir: str | Path) -> dict[str, Any] | None:
    """The stats.json of a shard directory, or None when absent (incomplete or never written)."""
    p = Path(out_dir) / STATS
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def summary_table(stats: dict[str, Any], title: str) -> str:
    """A small human-readable table of what was written and skipped, bytes and throughput."""
    rows = [("shards", str(len(stats["shards"]))), ("written", str(stats["written"]))]
    for reason, n in stats["skipped"].items():
        rows.append((f"skipped: {reason}", str(n)))
    if not stats["skipped"]:
        rows.append(("skipped", "0"))
    if "bytes" in stats:
        rows.append(("MB", f"{stats['bytes'] / 1e6:.2f}"))
    if "throughput" in stats:
        t = stats["throughput"]
        rows += [("written this run", str(t["samples"])), ("seconds", f"{t['seconds']:.2f}"),
                 ("samples/s", f"{t['samples_per_s']:.1f}")]
    width = max(len(r[0]) for r in rows)
    lines = [title, "-" * max(len(title), width + 10)]
    lines += [f"{k:<{width}}  {v:>8}" for k, v in rows]
    return "\n".join(lines)


def print_summary(stats: dict[str, Any], title: str, file: TextIO | None = None) -> None:
    print(summary_table(stats, title), file=file or sys.stdout)
