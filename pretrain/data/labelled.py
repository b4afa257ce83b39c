"""Held-out labelled shards for evaluation: (index, caption, class, image bytes) in a fixed order.

Evaluation needs every rank to agree on which sample is which, whatever the world size: the
samples are numbered in shard order (the order `resolve_shards` lists them), the first
`max_samples` valid ones are kept, and a rank decodes only the indices it owns (`index % world ==
rank`). Every rank reads the (small) held-out set's bytes but keeps the image bytes of its own
samples only; the checks that need no decoding (missing image or caption, undecodable caption or
JSON, repeated key) run on every rank, so all ranks number the same samples. Such samples are
skipped and counted by reason; a bad image is found only by the rank that decodes it (see
`pretrain.clip.evaluation`).

The class of a sample is `key.json["class"]`, or its caption `key.txt` when the JSON has none.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional

from baton.errors import BatonError
from pretrain.data.samples import IMAGE_KEYS, group_samples, shard_files, Tally
from pretrain.data.sources import resolve_sources

EMPTY_SHARDS_LIMIT = 1000   # consecutive shards without a file before giving up (a wrong path, not bad luck)


@dataclass
class LabelledSample:
    index: int                 # position among the kept samples, in shard order
    key: str
    caption: str
    label: str                 # the class name
    image: Optional[dict]      # {extension: image bytes} on the rank that owns `index`, else None


@dataclass
class LabelledSet:
    samples: list[LabelledSample]      # every kept sample (image bytes only for this rank's)
    skipped: Counter                   # reason -> count, identical on every rank

    def owned(self) -> list[LabelledSample]:
        return [s for s in self.samples if s.image is not None]


def _check(sample: dict[str, Any]) -> tuple[str, str, str] | str:
    """(caption, class, image extension) of a raw sample, or the reason to skip it."""
    if "__reject__" in sample:
        return sample["__reject__"]
    ext = next((k for k in IMAGE_KEYS if k in sample), None)
    if ext is None:
        return "missing_image"
    raw = sample.get("txt")
    if raw is None or not raw.strip():
        return "missing_caption"
    try:
        caption = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return "bad_caption"
    label = caption
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError:
            return "bad_json"
        if isinstance(meta, dict) and isinstance(meta.get("class"), str) and meta["class"].strip():
            label = meta["class"].strip()
    return caption, label, ext


def read_labelled(shards: Any, max_samples: Optional[int] = None, rank: int = 0, world_size: int = 1,
                  key: str = "eval.shards") -> LabelledSet:
    """The labelled samples of `shards` (a path, URL, brace pattern or list, as `data.train_shards`).

    The result lists the same samples, in the same order, on every rank; rank r holds the image
    bytes of the samples whose index % world_size == r. Raises `BatonError` naming `key` when the
    shards are missing or hold no usable sample.
    """
    try:
        urls = resolve_sources(shards).urls
    except BatonError as e:
        raise BatonError(f"{key}: {e}".replace("data.train_shards", key)) from None
    tally = Tally(where=key)
    skipped: Counter = Counter()
    samples: list[LabelledSample] = []
    raw_samples = group_samples(shard_files(enumerate(urls), tally, EMPTY_SHARDS_LIMIT))
    try:
        for raw in raw_samples:
            if max_samples is not None and len(samples) >= max_samples:
                break
            checked = _check(raw)
            if isinstance(checked, str):
                skipped[checked] += 1
                continue
            caption, label, ext = checked
            index = len(samples)
            samples.append(LabelledSample(index=index, key=raw["__key__"], caption=caption, label=label,
                                          image={ext: raw[ext]} if index % world_size == rank else None))
    finally:
        raw_samples.close()  # closes the shard being read when max_samples stops early
    skipped.update(tally.rejected)
    if not samples:
        raise BatonError(f"{key}={shards!r}: no usable labelled sample (skipped: {dict(skipped) or 'none'}); "
                         f"point it at held-out shards written by `baton shards` (e.g. data/emoji/test)")
    return LabelledSet(samples=samples, skipped=skipped)
