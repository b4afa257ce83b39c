"""Pending samples (`Item`) and the work that turns one into a `Sample` or a `Skip`.

A source only *plans*: it yields cheap `Item`s (a key, a caption, json fields and where the image
is: a path, a URL, a member of a tar, or bytes already in memory). The expensive part (fetching,
decoding, checking, resizing, re-encoding) is `process_item`, run by the shard workers, so every
source gets parallelism, resumability and the same options for free.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from data_prep.fetch import FetchOptions, read_source
from data_prep.images import ImageOptions, SkipSample, prepare_image
from data_prep.writer import Sample, Skip


@dataclass
class Item:
    """One input, not yet read. The image is `data` if given, else bytes [offset, offset+size)
    of the file `source` if `size` is given (a tar member), else the file or URL `source`."""

    key: str
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    data: bytes | None = None
    offset: int = 0
    size: int | None = None

    def identity(self) -> list[Any]:
        """What the shard content depends on (for the resume digest); bytes by their hash."""
        data = hashlib.sha256(self.data).hexdigest() if self.data is not None else None
        return [self.key, self.caption, self.meta, self.source, data, self.offset, self.size]


@dataclass(frozen=True)
class CaptionOptions:
    """Caption length limits in characters (after stripping spaces). A caption shorter than
    `min_chars` is skipped (`caption_too_short`); one longer than `max_chars` is cut to
    `max_chars` (`long="truncate"`, trailing spaces dropped) or skipped (`caption_too_long`)."""

    min_chars: int | None = None
    max_chars: int | None = None
    long: str = "truncate"  # or "skip"


@dataclass(frozen=True)
class PrepOptions:
    """Everything that decides what a shard holds, besides the items themselves."""

    image: ImageOptions = ImageOptions()
    caption: CaptionOptions = CaptionOptions()
    fetch: FetchOptions = FetchOptions()
    dedupe: bool = False

    def fingerprint(self) -> dict[str, Any]:
        """The options that change shard bytes (fetch settings only change what fails)."""
        return {"image": vars(self.image), "caption": vars(self.caption), "dedupe": self.dedupe}


def item_bytes(item: Item, fetch: FetchOptions) -> bytes:
    if item.data is not None:
        return item.data
    if item.size is not None:  # a member of a local tar (img2dataset output)
        try:
            with open(item.source, "rb") as f:
                f.seek(item.offset)
                data = f.read(item.size)
        except OSError as e:
            raise SkipSample("unreadable_file", f"{item.source}: {e}") from None
        if len(data) != item.size:
            raise SkipSample("unreadable_file", f"{item.source}: truncated tar member of {item.key}")
        return data
    return read_source(item.source, fetch)


def content_hash(item: Item | Sample, fetch: FetchOptions) -> str | None:
    """sha256 of the input image's bytes (what --dedupe compares); None when unreadable."""
    try:
        data = item.image if isinstance(item, Sample) else item_bytes(item, fetch)
    except SkipSample:
        return None
    return hashlib.sha256(data).hexdigest()


def check_caption(caption: str, opts: CaptionOptions, where: str) -> str:
    text = caption.strip()
    if not text:
        raise SkipSample("empty_caption", where)
    if opts.min_chars is not None and len(text) < opts.min_chars:
        raise SkipSample("caption_too_short", where)
    if opts.max_chars is not None and len(text) > opts.max_chars:
        if opts.long == "skip":
            raise SkipSample("caption_too_long", where)
        text = text[:opts.max_chars].rstrip()
    return text


def process_item(item: Item | Sample, opts: PrepOptions) -> Sample | Skip:
    """The Sample to write for `item`, or a Skip naming why not. A ready `Sample` (in-memory
    sources such as emoji) goes through unchanged: it was made for these shards."""
    if isinstance(item, Sample):
        return item
    where = item.meta.get("source") or item.source or item.key
    try:
        caption = check_caption(item.caption, opts.caption, where)
        data, ext = prepare_image(item_bytes(item, opts.fetch), where, opts.image)
    except SkipSample as e:
        return Skip(e.reason, e.detail or where)
    return Sample(key=item.key, image=data, ext=ext, caption=caption, meta=item.meta)
