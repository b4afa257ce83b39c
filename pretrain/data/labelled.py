"""Labelled shards, for every stage that reads them: (index, caption, class, image bytes) in a fixed order.

One reader for pretraining's held-out sets (`clip.eval.shards`, `dino.knn_shards`) and finetuning's
train and test splits (`data.source=shards`, `baton evaluate`), so that the same shards give the
same samples, in the same order, everywhere. It reads through the training loader's path
(`samples.shard_files`: fsspec with `baton.remote`'s timeouts, so local paths, http(s) and s3 all
work; `samples.group_samples`) and skips and counts what is bad instead of stopping at it.

Order: samples are numbered in shard order (the order `resolve_shards` lists them: stats.json's,
else sorted names), the first `max_samples` valid ones are kept, and a rank decodes only the
indices it owns (`index % world == rank`), so every rank agrees on which sample is which
whatever the world size. Every rank reads the set's bytes but keeps the image bytes of its own
samples only; the checks that need no decoding run on every rank, so all ranks number the same
samples. A bad image is found only by the rank that decodes it (`LabelledSet.decode_owned`, or
the caller's own loop as in `pretrain.clip.evaluation`).

Skipped, counted by reason and logged naming the shard and key (the first few of each reason):
`missing_image`, `missing_caption` / `bad_caption` (where a caption is required), `missing_class`
(where a `json["class"]` is required), `bad_json`, `duplicate_key`, `bad_image` (when decoded),
`unreadable_shard` (a read error: truncated, not a tar, unreachable) and `short_shard` (a shard that
held fewer samples than its stats.json `count`: cut at a member boundary, or rewritten). A
truncated shard is never read as a smaller dataset without a word: `check_skipped` fails naming
the shards once more than a fraction of the samples is lost.

The class of a sample is `key.json["class"]`, or (unless `class_required`) its caption `key.txt`.

Grounding shards (`grounding=True`: GLIP's `glip.eval.shards` and `baton evaluate` of a GLIP run) are
read by the same code, so they get the same order, rank split and skip rule: a sample needs
`key.json` holding a grounding record (`grounding_record`: a `caption` string and a `regions` list;
else `bad_json`, or `missing_caption` for an empty caption), its caption is the record's, and the
owning rank keeps the record's bytes beside the image's (`LabelledSample.raw`). What only the
owner finds (an undecodable image, a region without a box) it reports with `skip_owned`, and
`check_skipped_over_ranks` sums those over the ranks before the limit is applied, so every rank
decides alike and the error names the shard wherever the bad sample was read.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

from PIL import Image

from baton.distributed import all_gather_object
from baton.errors import BatonError
from baton.skips import check_skipped, skipped_fraction
from pretrain.data.samples import IMAGE_KEYS, Rejected, StreamProgress, decode_image, group_samples, shard_files
from pretrain.data.sources import resolve_sources

EMPTY_SHARDS_LIMIT = 1000   # consecutive shards without a file before giving up (a wrong path, not bad luck)
SHARD_REASONS = ("unreadable_shard", "short_shard")   # counted once per shard, not per sample
log = logging.getLogger("baton.data")


@dataclass
class LabelledSample:
    index: int                 # position among the kept samples, in shard order
    key: str
    caption: str               # "" where no caption is required and the sample has none
    label: str                 # the class name
    image: Optional[dict]      # {extension: image bytes} on the rank that owns `index`, else None
    url: str = ""              # the shard it came from
    record: Optional[bytes] = None   # grounding shards: the key.json bytes, on the owning rank

    def raw(self) -> dict:
        """The sample as webdataset gives it ({ext: bytes, "json": bytes, "__key__"}), for a sample
        map such as GLIP's `GroundingSample`; on the owning rank only."""
        if self.image is None:
            raise BatonError(f"sample {self.key} of {self.url} is not held on this rank")
        return {**self.image, **({"json": self.record} if self.record is not None else {}), "__key__": self.key}


def grounding_record(data: bytes) -> dict:
    """The grounding record of a `key.json` (pretrain/glip/data.py documents it): a dict with a
    non-empty `caption` string and a `regions` list, or `Rejected` (bad_json, missing_caption)."""
    try:
        rec = json.loads(data)
        caption, regions = rec["caption"], rec["regions"]
        if not isinstance(caption, str) or not isinstance(regions, list):
            raise TypeError("caption must be a string and regions a list")
    except KeyError as e:
        raise Rejected("bad_json", f"no {e} in the grounding record") from None
    except (ValueError, TypeError, AttributeError) as e:
        raise Rejected("bad_json", str(e)) from None
    if not caption.strip():
        raise Rejected("missing_caption")
    return rec


@dataclass
class LabelledSet:
    samples: list[LabelledSample]      # every kept sample (image bytes only for this rank's)
    skipped: Counter                   # reason -> count, identical on every rank (bad_image: this rank's)
    read: int = 0                      # samples read from the shards: kept, or skipped by the checks
    lost: int = 0                      # samples stats.json lists that could not be read (see `check_skipped`)
    bad_by_shard: Counter = field(default_factory=Counter)   # shard URL -> samples skipped or lost there
    progress: Optional[StreamProgress] = None      # logs each skip naming the shard and key
    # this rank's skips of its own samples (`skip_owned`): summed over ranks by `check_skipped_over_ranks`
    owner_progress: StreamProgress = field(default_factory=StreamProgress)
    owner_bad_by_shard: Counter = field(default_factory=Counter)

    def owned(self) -> list[LabelledSample]:
        return [s for s in self.samples if s.image is not None]

    def decode_owned(self) -> list[tuple[LabelledSample, Image.Image]]:
        """(sample, RGB image) for each of this rank's samples that decodes; the others are
        skipped and counted as `bad_image`, with a warning naming the shard and key."""
        out = []
        for s in self.owned():
            try:
                out.append((s, decode_image(s.image)))
            except Rejected as r:
                self._skip(r.reason, s.key, s.url, r.detail)
        return out

    def _skip(self, reason: str, key: str, url: str, detail: str = "") -> None:
        if self.progress is not None:
            self.progress.reject(reason, key, url, detail)   # counts into self.skipped (the same Counter)
        else:
            self.skipped[reason] += 1
        self.bad_by_shard[url] += 1

    def skip_owned(self, sample: LabelledSample, reason: str, detail: str = "") -> None:
        """One of this rank's samples found bad by its caller (decoding, a sample map's `Rejected`):
        logged naming the shard and key, counted apart from the checks every rank made alike."""
        self.owner_progress.reject(reason, sample.key, sample.url, detail)
        self.owner_bad_by_shard[sample.url] += 1

    def check_skipped_over_ranks(self, max_fraction: Optional[float], where: str,
                                 fraction_key: str = "clip.eval.max_skipped_fraction") -> Counter:
        """`check_skipped` with every rank's `skip_owned` counts added (a collective: every rank
        calls it); returns the skips by reason of the whole set, the same on every rank."""
        skipped, by_shard = Counter(self.skipped), Counter(self.bad_by_shard)
        for reasons, shards in all_gather_object((dict(self.owner_progress.rejected), dict(self.owner_bad_by_shard))):
            skipped.update(reasons)
            by_shard.update(shards)
        check_skipped(skipped, self.read, by_shard, max_fraction, where, fraction_key,
                      "Rewrite those shards with `baton shards`, or raise the limit to use what is left",
                      lost=self.lost, uncounted=SHARD_REASONS)
        return skipped

    def skipped_fraction(self) -> float:
        """Samples skipped or lost over the samples the shards should have given (read + lost)."""
        return skipped_fraction(self.skipped, self.read, self.lost, SHARD_REASONS)

    def check_skipped(self, max_fraction: Optional[float], where: str,
                      fraction_key: str = "data.max_skipped_fraction", bad_images: int = 0) -> None:
        """Raise `BatonError` naming the worst shards when more than `max_fraction` of the samples
        were skipped or lost (None: no limit); below it the skips stay counted and logged
        (`baton.skips`, the rule of every labelled set). `bad_images`: images found undecodable by
        a caller that decodes them itself (summed over the ranks, so every rank decides alike)."""
        skipped = self.skipped + Counter({"bad_image": bad_images}) if bad_images else self.skipped
        check_skipped(skipped, self.read, self.bad_by_shard, max_fraction, where, fraction_key,
                      "Rewrite those shards with `baton shards`, or raise the limit to use what is left",
                      lost=self.lost, uncounted=SHARD_REASONS)


def _check(sample: dict[str, Any], caption_required: bool, class_required: bool,
           grounding: bool = False) -> tuple[str, str, str] | str:
    """(caption, class, image extension) of a raw sample, or the reason to skip it."""
    if "__reject__" in sample:
        return sample["__reject__"]
    ext = next((k for k in IMAGE_KEYS if k in sample), None)
    if ext is None:
        return "missing_image"
    if grounding:
        if "json" not in sample:
            return "bad_json"
        try:
            return grounding_record(sample["json"])["caption"], "", ext
        except Rejected as r:
            return r.reason
    raw = sample.get("txt")
    caption = ""
    if raw is None or not raw.strip():
        if caption_required:
            return "missing_caption"
    else:
        try:
            caption = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            if caption_required:
                return "bad_caption"
    label = caption
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError:
            return "bad_json"
        if isinstance(meta, dict) and isinstance(meta.get("class"), str) and meta["class"].strip():
            label = meta["class"].strip()
        elif class_required:
            return "missing_class"
    elif class_required:
        return "missing_class"
    return caption, label, ext


def _count_short_shards(data: LabelledSet, urls: list[str], counts: dict[str, int], read: Counter,
                        stopped_at: Optional[str]) -> None:
    """Compare each fully read shard's samples with stats.json's `count`: the missing ones are
    `lost`, and a shard that read without an error but short is counted as `short_shard` (an
    unreadable one already is `unreadable_shard`). A shard that failed to read and has no count
    in stats.json adds one lost sample: at least one is missing, how many is unknown."""
    failed = {urls[n] for n in data.progress.failed}
    done = urls if stopped_at is None else urls[:urls.index(stopped_at)]
    for url in dict.fromkeys(done):
        expected = counts.get(url, 0) * urls.count(url)
        missing = expected - read[url] if url in counts else int(url in failed)
        if missing <= 0:
            continue
        data.lost += missing
        data.bad_by_shard[url] += missing
        if url not in failed:
            data.skipped["short_shard"] += 1
            log.warning("%s: shard %s held %d samples, but its stats.json lists %d (truncated or rewritten?)",
                        data.progress.where, url, read[url], expected)


def read_labelled(shards: Any, max_samples: Optional[int] = None, rank: int = 0, world_size: int = 1,
                  key: str = "clip.eval.shards", caption_required: bool = True,
                  class_required: bool = False, grounding: bool = False) -> LabelledSet:
    """The labelled samples of `shards` (a path, URL, brace pattern or list, as `data.train_shards`).

    The result lists the same samples, in the same order, on every rank; rank r holds the image
    bytes of the samples whose index % world_size == r. Raises `BatonError` naming `key` when the
    shards are missing or hold no usable sample. Finetuning needs a class but no caption
    (`caption_required=False, class_required=True`); CLIP evaluation needs a caption; GLIP's
    `grounding=True` a grounding record in `key.json` (its caption; the owner keeps the record).
    """
    try:
        sources = resolve_sources(shards)
    except BatonError as e:
        raise BatonError(f"{key}: {e}".replace("data.train_shards", key)) from None
    urls = sources.urls
    counts = {u: c for s in sources.sources for u, c in s.counts.items()}
    progress = StreamProgress(where=key)
    data = LabelledSet(samples=[], skipped=progress.rejected, progress=progress,
                       owner_progress=StreamProgress(where=key))
    read: Counter = Counter()   # shard URL -> samples read from it (kept or skipped)
    stopped_at = None
    raw_samples = group_samples(shard_files(enumerate(urls), progress, EMPTY_SHARDS_LIMIT))
    try:
        for raw in raw_samples:
            if max_samples is not None and len(data.samples) >= max_samples:
                stopped_at = raw["__url__"]
                break
            read[raw["__url__"]] += 1
            data.read += 1
            checked = _check(raw, caption_required, class_required, grounding)
            if isinstance(checked, str):
                data._skip(checked, raw["__key__"], raw["__url__"])
                continue
            caption, label, ext = checked
            index = len(data.samples)
            mine = index % world_size == rank
            data.samples.append(LabelledSample(index=index, key=raw["__key__"], caption=caption, label=label,
                                               image={ext: raw[ext]} if mine else None, url=raw["__url__"],
                                               record=raw["json"] if grounding and mine else None))
    finally:
        raw_samples.close()  # closes the shard being read when max_samples stops early
    _count_short_shards(data, urls, counts, read, stopped_at)
    if not data.samples:
        raise BatonError(f"{key}={shards!r}: no usable labelled sample (skipped: {dict(data.skipped) or 'none'}); "
                         f"point it at {'grounding' if grounding else 'labelled'} shards written by `baton shards` "
                         f"(e.g. data/{'grounding-emoji' if grounding else 'emoji'}/test)")
    return data
