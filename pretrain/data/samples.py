"""From shard bytes to training pairs, skipping and counting whatever is corrupt.

Stages, each a generator running inside one DataLoader worker:

- `shard_files`: opens each shard with fsspec and lists its files (`tar_reader`: the members
  webdataset's tar iterator gives, read faster); a shard that cannot be opened or read to the end
  is counted (`unreadable_shard`, once per position in the worker's shard sequence, so replaying
  after a resume does not count it twice).
- `group_samples`: groups consecutive files by key, like webdataset's `group_by_keys`, but where
  that raises on (or silently merges) a repeated key, this marks the later sample `duplicate_key`:
  a key seen before in the same shard, or the key the previous shard ended with (a sample split
  across a shard boundary). Marks travel with the sample and are counted only when the sample is
  consumed after the shuffle buffer, so counts stay exact across a resume.
- `SampleToPair`: decodes and checks one sample (`missing_image`, `missing_caption` (absent or
  blank), `bad_caption` (not UTF-8), `bad_image` (undecodable), `bad_json`), then augments and
  tokenises it. A bad sample raises `Rejected(reason)`; nothing here kills a worker.
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections import Counter
from typing import Any, Callable, Iterator

import torch
from PIL import Image
from webdataset.tariterators import base_plus_ext

from baton.errors import BatonError
from baton.images import rgb_on_white
from baton.registry import unknown_name
from baton.remote import open_url
from pretrain.data.tar_reader import tar_members

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
REASONS = ("unreadable_shard", "duplicate_key", "missing_image", "missing_caption", "bad_caption",
           "bad_image", "bad_json", "not_jpeg", "too_many_bytes")   # the last two: data.decode_on_device
LOG_FIRST = 3   # per worker and reason: the first few skips are logged with key and shard, then counted only
log = logging.getLogger("baton.data")


class Rejected(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


class StreamProgress:
    """One (logical) worker's progress through its epoch stream: what the checkpoint needs to resume it.

    consumed: samples taken from the shuffle buffer (used or skipped); rejected: skips by reason;
    failed: positions in the worker's shard sequence that could not be read.
    """

    def __init__(self, state: dict | None = None, where: str = ""):
        state = state or {}
        self.consumed = int(state.get("consumed", 0))
        self.rejected = Counter({k: int(v) for k, v in (state.get("rejected") or {}).items()})
        self.failed = set(int(n) for n in state.get("failed_shards", []))
        self.where = where
        self.reject_run = 0       # consecutive skips since the last accepted sample (hang guard)
        self.empty_run = 0        # consecutive shards without a file (hang guard)

    def reject(self, reason: str, key: str, url: str, detail: str = "") -> None:
        self.rejected[reason] += 1
        if self.rejected[reason] <= LOG_FIRST:
            log.warning("%s: skipped sample %s in %s: %s%s%s", self.where, key, url, reason,
                        f" ({detail})" if detail else "", " (further skips counted only)"
                        if self.rejected[reason] == LOG_FIRST else "")

    def shard_failed(self, n: int, url: str, error: Exception) -> None:
        if n in self.failed:
            return
        self.failed.add(n)
        self.rejected["unreadable_shard"] += 1
        if self.rejected["unreadable_shard"] <= LOG_FIRST:
            log.warning("%s: skipped the rest of shard %s: %s: %s", self.where, url, type(error).__name__, error)

    def state(self) -> dict:
        return {"consumed": self.consumed, "rejected": dict(self.rejected), "failed_shards": sorted(self.failed)}


def shard_files(shards: Iterator[tuple[int, str]], progress: StreamProgress, empty_limit: int) -> Iterator[dict]:
    """(position, url) pairs -> tar members {fname, data, __url__}; an empty dict ends each shard."""
    for n, url in shards:
        got = 0
        try:
            with open_url(url, "rb") as stream:
                for member in tar_members(stream):
                    got += 1
                    member["__url__"] = url
                    yield member
        except Exception as e:  # unreachable, truncated or not a tar: skip the rest of this shard
            progress.shard_failed(n, url, e)
        yield {}
        progress.empty_run = 0 if got else progress.empty_run + 1
        if progress.empty_run >= empty_limit:
            raise BatonError(f"{progress.where}: the last {progress.empty_run} shards read (e.g. {url}) held no files; "
                             f"check data.train_shards and rewrite the shards with `baton shards`")


def group_samples(files: Iterator[dict]) -> Iterator[dict]:
    """Tar members -> samples {__key__, __url__, ext: bytes}, marking repeated keys `duplicate_key`."""
    current: dict | None = None
    seen: set[str] = set()
    previous_last: str | None = None   # the key the previous shard ended with
    first_in_shard = True
    for f in files:
        if not f:  # end of a shard
            if current is not None:
                previous_last = current["__key__"]
                yield current
            current, seen, first_in_shard = None, set(), True
            continue
        key, ext = base_plus_ext(f["fname"])
        if key is None:
            continue
        ext = ext.lower()
        if current is None or key != current["__key__"] or ext in current:
            if current is not None:
                yield current
            current = {"__key__": key, "__url__": f["__url__"]}
            if key in seen or (first_in_shard and key == previous_last):
                current["__reject__"] = "duplicate_key"
            seen.add(key)
            first_in_shard = False
        current[ext] = f["data"]
    if current is not None:
        yield current


# The loader's per-sample map: (raw sample, per-sample seed) -> a tuple of tensors, or `Rejected`.
# A map may carry `row_normalize` (a uint8_images.BatchNormalize): its uint8 images are then turned
# into normalised float32 by the loader's workers as they copy them into the batch (batch_buffers).
SampleMap = Callable[[dict, int], tuple]


def decode_image(sample: dict[str, Any]) -> Image.Image:
    """The RGB image of a raw sample (transparency on white: `baton.images`), or `Rejected`
    (missing_image, bad_image, or a mark it carries)."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise Rejected("missing_image", f"files: {sorted(k for k in sample if not k.startswith('__'))}")
    if "__reject__" in sample:
        raise Rejected(sample["__reject__"])
    try:
        image = Image.open(io.BytesIO(sample[key]))
        image.load()
        return rgb_on_white(image)
    except Exception as e:  # PIL raises many types for broken files
        raise Rejected("bad_image", f"{type(e).__name__}: {e}") from None


def seeded_transform(transform: Callable, image: Image.Image, seed: int):
    """`transform(image)` with the random draws fixed by `seed`.

    torchvision draws from torch's global CPU RNG, open_clip's jitter from python's `random`: both
    are seeded for this sample. (Not torch.manual_seed: it also queues a lazy CUDA seeding with a
    captured stack, ~3 ms a call.) A failing transform is a `bad_image` rejection. In the training
    process (`data.workers=0`) the RNG states are put back afterwards, so that loading data does not
    move the training's own random stream; a DataLoader worker draws from them for nothing else and
    skips that (15 us a sample, 4-9 % of loading a 64 px image).
    """
    in_worker = torch.utils.data.get_worker_info() is not None
    if not in_worker:
        py_state, torch_state = random.getstate(), torch.default_generator.get_state()
    try:
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        return transform(image)
    except Exception as e:
        raise Rejected("bad_image", f"transform failed: {type(e).__name__}: {e}") from None
    finally:
        if not in_worker:
            random.setstate(py_state)
            torch.default_generator.set_state(torch_state)


class SampleToPair:
    """Raw sample -> (image tensor, token ids): check, decode, augment and pick a caption, seeded per sample.

    `row_normalize`: the transform ends in a uint8 tensor and the loader's workers normalise it
    into the batch (what ToTensor + Normalize would have given, in one pass; see SampleMap)."""

    def __init__(self, transform: Callable, tokenizer: Callable, caption: str, row_normalize: Callable | None = None):
        if caption not in ("txt", "random"):
            raise unknown_name("clip.caption", caption, ("txt", "random"))
        self.transform, self.tokenizer, self.caption = transform, tokenizer, caption
        self.row_normalize = row_normalize

    def captions(self, sample: dict[str, Any]) -> list[str]:
        """The candidate captions of a raw sample after every check that needs no image decoding, or
        `Rejected` (missing_image, missing_caption, bad_caption, a mark it carries, bad_json)."""
        if not any(k in sample for k in IMAGE_KEYS):
            decode_image(sample)  # raises missing_image
        raw = sample.get("txt")
        if raw is None or not raw.strip():
            raise Rejected("missing_caption")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Rejected("bad_caption", str(e)) from None
        if "__reject__" in sample:
            raise Rejected(sample["__reject__"])
        captions = [text]
        if self.caption == "random" and "json" in sample:
            try:
                captions += [c for c in (json.loads(sample["json"]) or {}).get("captions") or [] if c]
            except (ValueError, AttributeError) as e:
                raise Rejected("bad_json", str(e)) from None
        return captions

    def decode(self, sample: dict[str, Any]) -> tuple[Image.Image, list[str]]:
        """The image and candidate captions of a raw sample, or `Rejected`."""
        captions = self.captions(sample)
        return decode_image(sample), captions

    def pick_caption(self, captions: list[str], seed: int) -> str:
        return captions[0] if self.caption == "txt" else random.Random(seed).choice(captions)

    def __call__(self, sample: dict[str, Any], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, captions = self.decode(sample)
        pixels = seeded_transform(self.transform, image, seed)
        return pixels, self.tokenizer([self.pick_caption(captions, seed)])[0]
