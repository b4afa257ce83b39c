"""The options every file-based source shares (`baton shards folder|table|img2dataset ...`):
layout (shard size by count and bytes, workers, job-array part), image handling, caption limits,
dedupe and URL fetching; and `run_source`, which runs a source's plan as a shard job."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from baton.errors import BatonError
from data_prep.fetch import FetchOptions
from data_prep.images import ImageOptions
from data_prep.items import CaptionOptions, PrepOptions
from data_prep.job import JobLayout, Plan, describe, run_job
from data_prep.writer import print_summary


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _part(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected i/n (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"expected i/n with 0 <= i < n, got {text!r}")
    return i, n


def _quality(text: str) -> int:
    q = positive_int(text)
    if q > 100:
        raise argparse.ArgumentTypeError(f"expected a JPEG quality in 1..100, got {q}")
    return q


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a count >= 0, got {text!r}")
    return value


def add_layout_arguments(p: argparse.ArgumentParser) -> None:
    """--out and the shard layout (size, bytes, workers, part) alone: for sources whose images must
    keep their pixels (grounding boxes are in pixels), which therefore take no image options."""
    p.add_argument("--out", required=True, help="output shard directory")
    g = p.add_argument_group("shards and processes")
    g.add_argument("--shard-size", type=positive_int, default=500,
                   help="inputs per shard (default 500): shard k holds the samples of inputs "
                        "[k*N, (k+1)*N) in input order, fewer when some are skipped")
    g.add_argument("--shard-max-bytes", type=positive_int, default=None,
                   help="also split a shard into pieces shard-K-NNN.tar of at most this many bytes")
    g.add_argument("--workers", type=positive_int, default=1, help="worker processes (default 1)")
    g.add_argument("--part", type=_part, default=(0, 1), metavar="I/N",
                   help="job-array slice: write only shards k with k %% N == I (default 0/1: all)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_layout_arguments(p)
    g = p.add_argument_group("images")
    g.add_argument("--size", type=positive_int, default=None,
                   help="resize so the shorter side is SIZE (default: keep original bytes)")
    g.add_argument("--max-side", type=positive_int, default=None,
                   help="scale down so the longer side is at most S, keeping the aspect ratio")
    g.add_argument("--min-size", type=positive_int, default=None,
                   help="skip images whose shorter side is below this (counted as too_small)")
    g.add_argument("--jpeg-quality", type=_quality, default=None,
                   help="re-encode every image as JPEG at this quality (resized images are PNG otherwise)")
    g.add_argument("--dedupe", action="store_true",
                   help="skip images whose bytes equal an earlier input's (counted as duplicate)")
    g = p.add_argument_group("captions")
    g.add_argument("--min-caption-chars", type=positive_int, default=None,
                   help="skip captions shorter than this (caption_too_short)")
    g.add_argument("--max-caption-chars", type=positive_int, default=None,
                   help="captions longer than this are cut (or skipped with --long-captions skip)")
    g.add_argument("--long-captions", choices=("truncate", "skip"), default="truncate",
                   help="what --max-caption-chars does to a longer caption (default truncate)")
    g = p.add_argument_group("URLs (http/https, through fsspec)")
    g.add_argument("--timeout", type=_seconds, default=10.0, help="seconds per attempt (default 10)")
    g.add_argument("--retries", type=_count, default=2,
                   help="further attempts after timeouts, dropped connections, 5xx, 429 (default 2)")
    g.add_argument("--backoff", type=_seconds, default=0.5,
                   help="seconds before the first retry, doubled each time (default 0.5)")


def options_from_args(args: argparse.Namespace) -> tuple[PrepOptions, JobLayout]:
    if args.size is not None and args.max_side is not None and args.max_side < args.size:
        raise BatonError(f"--max-side {args.max_side} is smaller than --size {args.size}; pass one of them")
    if (args.min_caption_chars is not None and args.max_caption_chars is not None
            and args.min_caption_chars > args.max_caption_chars):
        raise BatonError("--min-caption-chars is larger than --max-caption-chars: every caption would be skipped")
    prep = PrepOptions(
        image=ImageOptions(size=args.size, max_side=args.max_side, min_size=args.min_size,
                           jpeg_quality=args.jpeg_quality),
        caption=CaptionOptions(args.min_caption_chars, args.max_caption_chars, args.long_captions),
        fetch=FetchOptions(timeout=args.timeout, retries=args.retries, backoff=args.backoff),
        dedupe=args.dedupe)
    return prep, layout_from_args(args)


def layout_from_args(args: argparse.Namespace) -> JobLayout:
    return JobLayout(shard_size=args.shard_size, shard_max_bytes=args.shard_max_bytes,
                     workers=args.workers, part=args.part)


def run_source(plan: Plan, args: argparse.Namespace, title: str, what: str,
               layout_only: bool = False) -> dict[str, Any]:
    """Run `plan` as a shard job with the command line's options; print the summary table.
    `what` names the input for the error when nothing at all could be written. `layout_only`:
    the source took `add_layout_arguments` only, so images and captions keep the defaults
    (every image fully decoded; PNG/JPEG bytes unchanged, other formats re-encoded as PNG)."""
    prep, layout = (PrepOptions(), layout_from_args(args)) if layout_only else options_from_args(args)
    stats = run_job(plan, args.out, prep, layout, log=sys.stdout)
    if stats.get("complete") is False:
        print_summary(stats, f"{title} (part {layout.part[0]}/{layout.part[1]})")
        print(describe(stats, args.out, layout.part))
        return stats
    print_summary(stats, title)
    if stats["written"] == 0:
        raise BatonError(f"no usable inputs in {what}; nothing was written (see the skipped counts)")
    return stats
