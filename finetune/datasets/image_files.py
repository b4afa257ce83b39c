"""The image files of finetuning's file sources (`folder`, `cub200`, `cars196`, `sop`), checked when
the split is loaded, by the rule of the shards source (`baton.skips`): a file that cannot be read
or decoded is skipped, counted by reason and named in a warning, and a split with more than
`data.max_skipped_fraction` of its files skipped is an error naming them. Never a decoder
traceback in the middle of training, never a silently smaller split.

The reasons are those `baton shards` gives the same files (`data_prep.images`): `missing_file`,
`not_a_file` (a FIFO, socket or device: never opened, so never waited on), `unreadable_file`
(permissions, a symlink loop, an I/O error) and `undecodable_image` (truncated, not an image,
over Pillow's decompression-bomb limit).

`folder` keeps the decoded images (small sets); the benchmarks keep paths and decode an image
when a batch needs it, so their files are only checked here: a JPEG in draft mode (every byte is
still read, so a truncated file fails) and several files at a time (Pillow releases the GIL
while it decodes).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from PIL import Image

from baton.images import rgb_on_white
from baton.skips import check_skipped
from data_prep.images import SkipSample, decode, read_bytes

LOG_FIRST = 5            # skipped files named in the log per reason; the rest are counted
log = logging.getLogger("baton.finetune")


class ImageFiles:
    """The files of one split: `keep` the readable ones, counting the others, then `check`."""

    def __init__(self, where: str):
        self.where = where
        self.skipped: Counter = Counter()
        self.bad_by_file: Counter = Counter()
        self.read = 0

    def _load(self, path: Path, keep_pixels: bool) -> tuple[Optional[Image.Image], Optional[SkipSample]]:
        try:
            img = decode(read_bytes(path), str(path), draft=not keep_pixels)
            return (rgb_on_white(img) if keep_pixels else None), None
        except SkipSample as skip:
            return None, skip

    def keep(self, rows: list[tuple], keep_pixels: bool) -> list[tuple]:
        """The rows whose file (their first field, a Path) reads and decodes, in their order; with
        `keep_pixels` the path is replaced by the decoded RGB image."""
        threads = 1 if keep_pixels else min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(threads) as pool:
            loaded = list(pool.map(lambda row: self._load(Path(row[0]), keep_pixels), rows))
        out = []
        for row, (img, skip) in zip(rows, loaded):
            self.read += 1
            if skip is None:
                out.append((img, *row[1:]) if keep_pixels else row)
                continue
            self.skipped[skip.reason] += 1
            self.bad_by_file[str(row[0])] += 1
            if self.skipped[skip.reason] <= LOG_FIRST:
                log.warning("%s: skipped %s: %s%s", self.where, row[0], skip,
                            " (further ones counted only)" if self.skipped[skip.reason] == LOG_FIRST else "")
        return out

    def check(self, max_fraction: Optional[float]) -> None:
        """Fail past `max_fraction` (None: no limit); below it, one line with the counts."""
        check_skipped(self.skipped, self.read, self.bad_by_file, max_fraction, self.where,
                      "data.max_skipped_fraction; `baton evaluate --max-skipped-fraction`",
                      "Remove or replace those files, or raise the limit to use what is left")
        if self.skipped:
            log.warning("%s: %d of %d image files kept, skipped by reason: %s", self.where,
                        self.read - sum(self.skipped.values()), self.read, dict(sorted(self.skipped.items())))


def checked_split(rows: dict[str, list[tuple]], root: Path, max_fraction: Optional[float],
                  keep_pixels: bool = False) -> dict[str, list[tuple]]:
    """`rows` of each split ("train", "test": tuples whose first field is a file Path) without the
    files that cannot be used, each split checked against `max_fraction`."""
    out = {}
    for split, split_rows in rows.items():
        files = ImageFiles(f"data.root={root} ({split} split)")
        out[split] = files.keep(split_rows, keep_pixels)
        files.check(max_fraction)
    return out
