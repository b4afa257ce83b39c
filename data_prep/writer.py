"""The one shard writer every source uses: records in, `shard-NNNNNN.tar` + `stats.json` out.

Contract (docs/architecture.md): shards `shard-000000.tar`, ... in one directory, `stats.json`
beside them with `num_samples`, `shards` [{name, count}], `written` and `skipped` {reason: count}.
Each shard is written under a temporary name and renamed only when complete, and `stats.json`
is removed first and written last (atomically), so a directory with a `stats.json` is always a
complete, consistent set; an interrupted run never leaves a partial `shard-*.tar`.
Tar headers use a fixed mtime/owner, so the same records always give byte-identical shards.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, TextIO

import webdataset as wds

from baton.errors import BatonError
from baton.io import atomic_path, write_json_atomic

SHARD_PATTERN = "shard-{:06d}.tar"
STATS = "stats.json"
# Fixed tar header fields: reproducible bytes whatever the clock or user.
TAR_MTIME = 0.0
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


class _Keys:
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


def write_shards(records: Iterable[Sample | Skip], out_dir: str | Path, shard_size: int = 500,
                 log: TextIO | None = None, max_logged_skips: int = 10) -> dict[str, Any]:
    """Write `records` as shards in `out_dir`; return (and write) the stats dict.

    Skips are counted by reason and the first `max_logged_skips` are printed to `log` with the
    file they concern. Shards of an earlier run that are not part of this one are removed at the
    end, so globbing `shard-*.tar` and reading stats.json agree.
    """
    if shard_size < 1:
        raise BatonError(f"--shard-size must be at least 1, got {shard_size}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BatonError(f"output {out} exists and is not a directory; pass a directory with --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / STATS).unlink(missing_ok=True)  # the directory is incomplete until stats.json is back

    keys = _Keys()
    skipped: Counter[str] = Counter()
    shards: list[dict[str, Any]] = []
    it = iter(records)

    def next_sample() -> Sample | None:
        """The next Sample, counting (and logging the first few) Skips on the way."""
        for rec in it:
            if isinstance(rec, Skip):
                if log is not None and sum(skipped.values()) < max_logged_skips:
                    print(f"  skipped ({rec.reason}): {rec.where}", file=log)
                skipped[rec.reason] += 1
                continue
            return rec
        return None

    sample = next_sample()
    while sample is not None:  # a shard is opened only when there is a sample to put in it
        name = SHARD_PATTERN.format(len(shards))
        count = 0
        with atomic_path(out / name) as tmp:
            with open(tmp, "wb") as f, wds.TarWriter(f, user=TAR_USER, group=TAR_USER,
                                                     encoder=False, mtime=TAR_MTIME) as tw:
                while sample is not None and count < shard_size:
                    tw.write(_encode(sample, keys.unique(sample.key)))
                    count += 1
                    sample = next_sample() if count < shard_size else None
        shards.append({"name": name, "count": count})
        if count == shard_size:
            sample = next_sample()

    keep = {s["name"] for s in shards}
    for stale in out.glob("shard-*.tar"):
        if stale.name not in keep:
            stale.unlink()
    total = sum(s["count"] for s in shards)
    stats = {"num_samples": total, "shards": shards, "written": total, "skipped": dict(sorted(skipped.items()))}
    write_json_atomic(out / STATS, stats)
    return stats


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
    """A small human-readable table of what was written and skipped."""
    rows = [("shards", str(len(stats["shards"]))), ("written", str(stats["written"]))]
    for reason, n in stats["skipped"].items():
        rows.append((f"skipped: {reason}", str(n)))
    if not stats["skipped"]:
        rows.append(("skipped", "0"))
    width = max(len(r[0]) for r in rows)
    lines = [title, "-" * max(len(title), width + 10)]
    lines += [f"{k:<{width}}  {v:>7}" for k, v in rows]
    return "\n".join(lines)


def print_summary(stats: dict[str, Any], title: str, file: TextIO | None = None) -> None:
    print(summary_table(stats, title), file=file or sys.stdout)
