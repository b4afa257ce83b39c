"""Table source: a CSV or TSV with an image-path column and a caption column.

Image paths are relative to the table's own directory (absolute paths are used as given), so a
table and its images can be moved together. Every other column is kept in the sample's json;
a `class` column, when present, is the class, otherwise the caption is (one class per caption).
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path
from typing import Iterator

from baton.errors import BatonError
from data_prep.images import SkipSample, load_image
from data_prep.writer import Sample, Skip, print_summary, write_shards

NAME = "csv"
HELP = "CSV/TSV table of image paths and captions; other columns kept in json"
_SEPARATORS = {"auto": None, "comma": ",", "tab": "\t", "\\t": "\t", "semicolon": ";", "pipe": "|"}


def resolve_separator(path: Path, sep: str, sample: str) -> str:
    """`sep` as a character: by name/character, else from the extension, else sniffed."""
    if sep != "auto":
        sep = _SEPARATORS.get(sep, sep)
        if len(sep) != 1:
            raise BatonError(f"--sep must be one character or one of {', '.join(_SEPARATORS)}; got {sep!r}")
        return sep
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".tab"):
        return "\t"
    if suffix == ".csv":
        return ","
    try:
        return csv.Sniffer().sniff(sample, delimiters=",\t;|").delimiter
    except csv.Error:
        raise BatonError(f"{path}: cannot tell the column separator; pass --sep comma|tab|semicolon|pipe") from None


def read_table(path: Path, sep: str = "auto") -> tuple[list[str], list[dict[str, str | None]]]:
    """(header, rows) of the table; a BatonError naming the file for anything unreadable."""
    if not path.exists():
        raise BatonError(f"table not found: {path} (pass a .csv or .tsv file with a header row)")
    if not path.is_file():
        raise BatonError(f"{path} is not a file (pass a .csv or .tsv file with a header row)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise BatonError(f"{path}: not UTF-8 text ({e}); re-save the table as UTF-8") from None
    delimiter = resolve_separator(path, sep, text[:65536])
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        rows = list(reader)
    except csv.Error as e:
        raise BatonError(f"{path}: malformed table at line {reader.line_num}: {e}") from None
    header = [h for h in (reader.fieldnames or []) if h is not None]
    if not header:
        raise BatonError(f"{path}: empty table; expected a header row naming the image and caption columns")
    return header, rows


def iter_records(path: str | Path, image_col: str = "image", caption_col: str = "caption",
                 sep: str = "auto", size: int | None = None) -> Iterator[Sample | Skip]:
    path = Path(path)
    header, rows = read_table(path, sep)
    for col, flag in ((image_col, "--image-col"), (caption_col, "--caption-col")):
        if col not in header:
            raise BatonError(f"{path}: no column '{col}' (columns: {', '.join(header)}); "
                             f"name the right one with {flag}")
    base = path.parent
    for i, row in enumerate(rows):
        line = f"{path.name} row {i + 2}"  # +1 for the header, +1 for 1-based line numbers
        image, caption = (row.get(image_col) or "").strip(), (row.get(caption_col) or "").strip()
        if not image:
            yield Skip("missing_image_path", line)
            continue
        if not caption:
            yield Skip("empty_caption", line)
            continue
        img_path = Path(image) if Path(image).is_absolute() else base / image
        try:
            data, ext = load_image(img_path, size)
        except SkipSample as e:
            yield Skip(e.reason, f"{line}: {e.detail or img_path}")
            continue
        extra = {k: v for k, v in row.items() if k is not None and k not in (image_col, caption_col)}
        meta = {"captions": [], **extra, "source": image}
        meta["class"] = extra.get("class") or caption
        yield Sample(key=f"{i:07d}_{Path(image).stem}", image=data, ext=ext, caption=caption, meta=meta)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="CSV or TSV table with a header row")
    p.add_argument("--out", required=True, help="output shard directory")
    p.add_argument("--image-col", default="image", help="column with image paths (default: image)")
    p.add_argument("--caption-col", default="caption", help="column with captions (default: caption)")
    p.add_argument("--sep", default="auto",
                   help="separator: auto (by extension, else sniffed), comma, tab, semicolon, pipe or a character")
    p.add_argument("--shard-size", type=int, default=500, help="samples per shard (default 500)")
    p.add_argument("--size", type=int, default=None,
                   help="resize so the shorter side is SIZE and store PNG (default: keep original bytes)")


def run(args: argparse.Namespace) -> int:
    path = Path(args.file)
    records = iter_records(path, args.image_col, args.caption_col, args.sep, args.size)
    first = next(records, None)  # table and column errors surface here, before --out is touched
    stats = write_shards(_chain(first, records), args.out, args.shard_size, log=sys.stdout)
    print_summary(stats, f"table {path} -> {args.out}")
    if stats["written"] == 0:
        raise BatonError(f"no usable rows in {path}; nothing was written (see the skipped counts)")
    return 0


def _chain(first, rest):
    if first is not None:
        yield first
    yield from rest
