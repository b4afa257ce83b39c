"""Table source: a CSV, TSV or parquet table with an image column and a caption column.

The image column holds paths or http(s) URLs (fetched by the shard workers through fsspec, see
data_prep.fetch). Paths are relative to the table's own directory (absolute paths are used as
given), so a table and its images can be moved together. Every other column is kept in the
sample's json; a `class` column, when present, is the class, otherwise the caption is.
Parquet is read with pyarrow in record batches, so a large table is not held in memory twice.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
from pathlib import Path, PurePosixPath
from typing import Any, Iterator
from urllib.parse import urlparse

from baton.errors import BatonError
from data_prep import options
from data_prep.fetch import is_url
from data_prep.items import Item
from data_prep.writer import Skip

NAME = "table"
ALIASES = ("csv", "parquet")
HELP = "CSV/TSV/parquet table of image paths or URLs and captions; other columns kept in json"
PARQUET_SUFFIXES = (".parquet", ".pq")
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


def _json_value(v: Any) -> Any:
    """A parquet cell as a JSON value (dates, decimals, bytes as text; NaN as null)."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return None if math.isnan(v) else v
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    return str(v)


def iter_parquet(path: Path, columns: tuple[str, str]) -> tuple[list[str], Iterator[dict[str, Any]]]:
    """(header, rows) of a parquet file, read in record batches."""
    if not path.is_file():
        raise BatonError(f"table not found: {path} (pass a .csv, .tsv or .parquet file)")
    try:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
    except ImportError:
        raise BatonError("parquet tables need pyarrow: pip install pyarrow") from None
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
        raise BatonError(f"{path}: not a readable parquet file ({e})") from None
    header = list(pf.schema_arrow.names)

    def rows() -> Iterator[dict[str, Any]]:
        for batch in pf.iter_batches(batch_size=65536):
            for row in batch.to_pylist():
                yield {k: _json_value(v) for k, v in row.items()}
    return header, rows()


def _stem(image: str) -> str:
    return PurePosixPath(urlparse(image).path).stem if is_url(image) else Path(image).stem


def iter_records(path: str | Path, image_col: str = "image", caption_col: str = "caption",
                 sep: str = "auto") -> Iterator[Item | Skip]:
    path = Path(path)
    if path.suffix.lower() in PARQUET_SUFFIXES:
        header, rows = iter_parquet(path, (image_col, caption_col))
    else:
        header, rows = read_table(path, sep)
    for col, flag in ((image_col, "--image-col"), (caption_col, "--caption-col")):
        if col not in header:
            raise BatonError(f"{path}: no column '{col}' (columns: {', '.join(header)}); "
                             f"name the right one with {flag}")
    base = path.parent
    for i, row in enumerate(rows):
        line = f"{path.name} row {i + 2}"  # +1 for the header, +1 for 1-based line numbers
        image = str(row.get(image_col) or "").strip()
        caption = str(row.get(caption_col) or "").strip()
        if not image:
            yield Skip("missing_image_path", line)
            continue
        if not caption:
            yield Skip("empty_caption", line)
            continue
        if is_url(image) or Path(image).is_absolute():
            source = image
        else:
            source = str(base / image)
        extra = {k: v for k, v in row.items() if k is not None and k not in (image_col, caption_col)}
        meta = {"captions": [], **extra, "source": image}
        meta["class"] = extra.get("class") or caption
        yield Item(key=f"{i:07d}_{_stem(image)}", caption=caption, meta=meta, source=source)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="CSV, TSV or parquet table with image and caption columns")
    p.add_argument("--image-col", default="image", help="column with image paths or URLs (default: image)")
    p.add_argument("--caption-col", default="caption", help="column with captions (default: caption)")
    p.add_argument("--sep", default="auto",
                   help="CSV separator: auto (by extension, else sniffed), comma, tab, semicolon, pipe or a character")
    options.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    path = Path(args.file)
    records = iter_records(path, args.image_col, args.caption_col, args.sep)
    next(records, None)  # table and column errors surface here, before --out is touched
    options.run_source(lambda: iter_records(path, args.image_col, args.caption_col, args.sep), args,
                       f"table {path} -> {args.out}", str(path))
    return 0
