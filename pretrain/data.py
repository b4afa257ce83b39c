"""Image-text batches from WebDataset shards, read through fsspec (local paths, http://, s3://, ...).

Why the pipeline looks like this:
- Shards are *resampled* (drawn with replacement, seeded by seed, epoch, rank and worker) and each
  worker yields a fixed number of batches (`with_epoch`), so every rank runs the same number of
  steps and nothing hangs when there are fewer shards than ranks x workers.
- Each sample's augmentation and caption choice are seeded from (seed, epoch, rank, worker,
  sample index), not from a process's global RNG, so an epoch's batches are a pure function of
  the config: a resumed run rebuilds the epoch's loader and skips the batches already trained on.
- The shard list is resolved and checked before training, so a wrong path fails at once with a
  message naming it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator

import braceexpand
import fsspec
import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander
from webdataset.utils import make_seed

from baton.errors import BatonError
from pretrain.config import DataConfig

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
HINT = "run `baton shards ...` first, or fix data.train_shards"


@dataclass
class ShardList:
    urls: list[str]          # one fsspec URL or local path per shard
    num_samples: int | None  # from stats.json, None if unknown


def _is_url(path: str) -> bool:
    return "://" in path


def _read_stats(stats_url: str) -> dict | None:
    try:
        with fsspec.open(stats_url, "rt") as f:
            return json.load(f)
    except (FileNotFoundError, OSError):
        return None
    except json.JSONDecodeError as e:
        raise BatonError(f"{stats_url}: not valid JSON ({e}); rewrite the shards with `baton shards`") from None


def resolve_shards(spec: str) -> ShardList:
    """Expand `data.train_shards` into shard URLs and check that each exists."""
    spec = str(spec)
    fs, root = fsspec.core.url_to_fs(spec)
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
        base, stats = None, None
        urls = list(braceexpand.braceexpand(spec))
    missing = [u for u in urls if not _exists(u)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise BatonError(f"shard not found: {missing[0]}{more}; {HINT}")
    if stats is None:
        parent = urls[0].rsplit("/", 1)[0] if "/" in urls[0] else "."
        stats = _read_stats(f"{parent}/stats.json")
    return ShardList(urls=urls, num_samples=_count(stats, urls))


def _exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def _count(stats: dict | None, urls: list[str]) -> int | None:
    """Samples in `urls` according to stats.json (per-shard counts when the shards are a subset)."""
    if not stats:
        return None
    counts = {s["name"]: s["count"] for s in stats.get("shards", [])}
    names = [u.rsplit("/", 1)[-1] for u in urls]
    if counts and all(n in counts for n in names):
        return sum(counts[n] for n in names)
    return stats.get("num_samples")


def _fsspec_opener(src: Iterator[dict]) -> Iterator[dict]:
    """webdataset stage: open each dict(url=...) with fsspec (its own gopen shells out to curl)."""
    for item in src:
        f = fsspec.open(item["url"], "rb").open()
        try:
            yield {**item, "stream": f}
        finally:
            f.close()


def _worker_seed(rank: int) -> int:
    info = torch.utils.data.get_worker_info()
    return rank * 1000 + (info.id if info is not None else 0)


def _seeded(src: Iterator[dict], base: int, rank: int) -> Iterator[dict]:
    """Attach a per-sample seed: (base, rank, worker, index in this worker's stream)."""
    worker = _worker_seed(rank)
    for i, sample in enumerate(src):
        sample["__seed__"] = make_seed(base, worker, i)
        yield sample


class SampleToPair:
    """Decoded sample -> (image tensor, token ids): augment and pick a caption, seeded per sample."""

    def __init__(self, transform: Callable, tokenizer: Callable, caption: str):
        if caption not in ("txt", "random"):
            raise BatonError(f"data.caption must be 'txt' or 'random', not {caption!r}")
        self.transform, self.tokenizer, self.caption = transform, tokenizer, caption

    def __call__(self, sample: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        if key is None or "txt" not in sample:
            raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} lacks an image "
                             f"({'/'.join(IMAGE_KEYS)}) or txt; present: {sorted(sample)}")
        seed = sample["__seed__"]
        # torchvision draws from torch's global RNG, open_clip's jitter from python's `random`:
        # seed both for this sample and put the process's own states back afterwards.
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            image = self.transform(sample[key])
        random.setstate(py_state)
        text = sample["txt"]
        if self.caption == "random":
            extra = (sample.get("json") or {}).get("captions") or []
            text = random.Random(seed).choice([text, *extra])
        return image, self.tokenizer([text])[0]


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    steps = num_samples // (batch_size * world_size)
    if steps < 1:
        raise BatonError(f"data.num_samples={num_samples} is less than one global batch "
                         f"(data.batch_size={batch_size} x {world_size} ranks); lower data.batch_size")
    return steps


def make_loader(shards: ShardList, dcfg: DataConfig, to_pair: SampleToPair, *, seed: int, epoch: int,
                rank: int, steps: int) -> torch.utils.data.DataLoader:
    """A DataLoader yielding (images, tokens) batches for one epoch; iterate at most `steps` of them.

    Deterministic for (seed, epoch, rank, workers): two loaders built alike yield the same batches
    in the same order (DataLoader returns worker batches round-robin).
    """
    workers = max(0, dcfg.workers)
    per_worker = -(-steps // max(1, workers))  # ceil: the loader is cut at `steps` by the caller
    base = make_seed(seed, epoch)
    pipeline = wds.DataPipeline(
        wds.ResampledShards(shards.urls, seed=base, worker_seed=partial(_worker_seed, rank), deterministic=True),
        _fsspec_opener,
        tar_file_expander,
        group_by_keys,
        *([wds.detshuffle(dcfg.shuffle_buffer, initial=min(100, dcfg.shuffle_buffer), seed=base + rank)]
          if dcfg.shuffle_buffer > 1 else []),
        partial(_seeded, base=base, rank=rank),
        wds.decode("pil"),
        wds.map(to_pair),
        wds.batched(dcfg.batch_size, partial=False),
    ).with_epoch(per_worker)
    return torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=workers,
                                       persistent_workers=False, prefetch_factor=4 if workers else None)
