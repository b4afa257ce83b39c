"""Where the shards are: `data.train_shards` resolved to weighted sources, and each epoch's shard plan.

`data.train_shards` is one source (a string) or a list of sources mixed with upsampling weights:

    train_shards: data/emoji/train
    train_shards: [{url: s3://bucket/laion/, weight: 1.0}, {url: /data/cc12m/, weight: 2.0}]

A source is a directory of *.tar (local or any fsspec URL; a URL ending in "/" is read through the
stats.json beside its shards), one .tar, or a brace pattern. The sample count comes from baton's
stats.json, else from img2dataset's per-shard `NNNNN_stats.json` (its output is read unchanged).
A source's `weight` multiplies its share: in resampled mode each of its shards is drawn `weight` times as often; in epoch-exact mode each of
its shards is read `floor(weight)` times per epoch plus a seeded subset for the fraction.
Everything is resolved and checked before training, so a wrong path fails at once naming it.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from typing import Any

import braceexpand
from webdataset.utils import make_seed

from baton.errors import BatonError
from baton.registry import unknown_name
from baton.remote import open_url, url_to_fs

HINT = "run `baton shards ...` first, or fix data.train_shards"
MODES = ("resampled", "epoch_exact")


@dataclass
class ShardList:
    urls: list[str]          # one fsspec URL or local path per shard
    num_samples: int | None  # from stats.json (or img2dataset's NNNNN_stats.json), None if unknown
    weight: float = 1.0      # upsampling factor of this source
    spec: str = ""           # the source as the user wrote it
    counts: dict[str, int] = field(default_factory=dict)  # samples per shard URL, where stats.json says


@dataclass
class Sources:
    """All training sources, in config order."""
    sources: list[ShardList]

    @property
    def urls(self) -> list[str]:
        return [u for s in self.sources for u in s.urls]

    @property
    def num_samples(self) -> int | None:
        """Samples per epoch implied by the weights: sum of weight x samples; None if any is unknown."""
        if any(s.num_samples is None for s in self.sources):
            return None
        return int(sum(s.weight * s.num_samples for s in self.sources))

    def epoch_shards(self, seed: int, epoch: int) -> list[str]:
        """Epoch-exact mode: every shard `weight` times (the fraction a seeded subset), shuffled by epoch."""
        plan: list[str] = []
        for i, s in enumerate(self.sources):
            whole = math.floor(s.weight)
            plan += s.urls * whole
            extra = round((s.weight - whole) * len(s.urls))
            plan += random.Random(make_seed(seed, epoch, i, 7)).sample(s.urls, extra)
        random.Random(make_seed(seed, epoch)).shuffle(plan)
        return plan

    def shards_per_epoch(self) -> int:
        return len(self.epoch_shards(0, 0))

    def check_enough_shards(self, mode: str, world_size: int, workers: int) -> None:
        """Epoch-exact mode needs a shard for every (rank, worker): say so now instead of hanging later."""
        if mode not in MODES:
            raise unknown_name("data.mode", mode, MODES)
        readers = world_size * max(1, workers)
        have = self.shards_per_epoch()
        if mode == "epoch_exact" and have < readers:
            fewer = (f"lower data.workers to {have // world_size}, " if have >= world_size else "")
            raise BatonError(
                f"data.mode=epoch_exact needs at least one shard per reader: {world_size} ranks x "
                f"{max(1, workers)} workers = {readers} readers, but an epoch has {have} shards "
                f"({', '.join(s.spec for s in self.sources)}). Fix: {fewer}use data.mode=resampled, or "
                f"re-shard into at least {readers} smaller shards (`baton shards ... --shard-size N`)")


def _is_url(path: str) -> bool:
    return "://" in path


def _read_stats(stats_url: str) -> dict | None:
    try:
        with open_url(stats_url, "rt") as f:
            return json.load(f)
    except (FileNotFoundError, OSError):
        return None
    except json.JSONDecodeError as e:
        raise BatonError(f"{stats_url}: not valid JSON ({e}); rewrite the shards with `baton shards`") from None


def _exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return fs.exists(path)


def resolve_shards(spec: str, weight: float = 1.0) -> ShardList:
    """Expand one source into shard URLs and check that each exists."""
    spec = str(spec)
    fs, root = url_to_fs(spec)
    if ("{" not in spec and not spec.endswith(".tar")) and (spec.endswith("/") or fs.isdir(root)):
        base = spec.rstrip("/")
        stats = _read_stats(f"{base}/stats.json")
        if stats is not None and stats.get("shards"):
            urls = [f"{base}/{s['name']}" for s in stats["shards"]]
        elif _is_url(spec) and not fs.isdir(root):
            raise BatonError(f"no stats.json at {base}/stats.json to list the shards of {spec}; "
                             f"serve a directory written by `baton shards`, or give a brace pattern "
                             f"like {base}/shard-{{000000..000007}}.tar")
        else:
            urls = sorted(fs.unstrip_protocol(p) if _is_url(spec) else p for p in fs.glob(f"{root}/*.tar"))
        if not urls:
            raise BatonError(f"no *.tar shards in {spec}; {HINT}")
    else:
        stats = None
        urls = list(braceexpand.braceexpand(spec))
    missing = [u for u in urls if not _exists(u)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise BatonError(f"shard not found: {missing[0]}{more}; {HINT}")
    if stats is None:
        parent = urls[0].rsplit("/", 1)[0] if "/" in urls[0] else "."
        stats = _read_stats(f"{parent}/stats.json")
    if stats is None:  # not written by `baton shards`: perhaps by img2dataset
        counts = img2dataset_counts(urls)
        num_samples = sum(counts.values()) if len(counts) == len(urls) else None
        return ShardList(urls=urls, num_samples=num_samples, weight=weight, spec=spec, counts=counts)
    per_shard = {s["name"]: s["count"] for s in (stats or {}).get("shards", [])}
    counts = {u: per_shard[u.rsplit("/", 1)[-1]] for u in urls if u.rsplit("/", 1)[-1] in per_shard}
    return ShardList(urls=urls, num_samples=_count(stats, urls, counts), weight=weight, spec=spec, counts=counts)


def img2dataset_counts(urls: list[str]) -> dict[str, int]:
    """{shard URL: samples} from img2dataset's per-shard `NNNNN_stats.json` (`successes`: the
    samples it wrote into `NNNNN.tar`), so its output trains with no `data.num_samples`. Empty when
    the first shard has none (not img2dataset's output: no request per shard is wasted)."""
    counts: dict[str, int] = {}
    for i, url in enumerate(urls):
        stats_url = f"{url[:-len('.tar')]}_stats.json" if url.endswith(".tar") else None
        stats = _read_stats(stats_url) if stats_url else None
        if stats is None or not isinstance(stats.get("successes"), int):
            if i == 0:
                return {}
            continue
        counts[url] = int(stats["successes"])
    return counts


def _count(stats: dict | None, urls: list[str], counts: dict[str, int]) -> int | None:
    """Samples in `urls` according to stats.json (per-shard counts when the shards are a subset)."""
    if not stats:
        return None
    if counts and len(counts) == len(urls):
        return sum(counts.values())
    return stats.get("num_samples")


def resolve_sources(train_shards: Any) -> Sources:
    """`data.train_shards` (a string, or a list of strings / {url, weight} mappings) -> Sources."""
    items = train_shards if isinstance(train_shards, (list, tuple)) else [train_shards]
    if not items:
        raise BatonError(f"data.train_shards is an empty list; {HINT}")
    sources = []
    for i, item in enumerate(items):
        if isinstance(item, str) or hasattr(item, "__fspath__"):
            url, weight = str(item), 1.0
        elif hasattr(item, "keys") and "url" in item and set(item.keys()) <= {"url", "weight"}:
            url, weight = str(item["url"]), float(item.get("weight", 1.0))
        else:
            raise BatonError(f"data.train_shards[{i}] must be a path/URL or {{url: ..., weight: ...}}, "
                             f"not {item!r}")
        if not weight > 0:
            raise BatonError(f"data.train_shards[{i}] ({url}): weight must be > 0, not {weight}")
        sources.append(resolve_shards(url, weight))
    return Sources(sources)
