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


def read_table(path: Path, sep: str = "auto") -> tuple[list[str], list[tuple[int, dict[str, str | None] | Skip]]]:
    """(header, [(line, row)]) of the table; a bad row is a `Skip` in its place, so that one broken
    line of a million costs that row, counted, not the run: more cells than the header has
    (`malformed_row`: the cells cannot be matched to columns, e.g. an unquoted comma in a caption),
    a quote the csv module refuses (`malformed_row`), bytes that are not UTF-8 (`undecodable_row`).
    Missing trailing cells are empty. A BatonError naming the file for what spoils the whole table:
    unreadable, no header, or a quote left open, which would swallow every row after it."""
    if not path.exists():
        raise BatonError(f"table not found: {path} (pass a .csv or .tsv file with a header row)")
    if not path.is_file():
        raise BatonError(f"{path} is not a file (pass a .csv or .tsv file with a header row)")
    try:
        text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")   # bad bytes kept, per row
    except OSError as e:
        raise BatonError(f"{path}: cannot read the table ({e})") from None
    delimiter = resolve_separator(path, sep, text[:65536])
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    rows: list[tuple[int, dict[str, str | None] | Skip]] = []
    while True:
        line = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            if "unexpected end of data" in str(e):
                raise BatonError(f"{path}: the quote opened on line {line} is never closed, so every line after it "
                                 f"would be one cell; close it (a quote inside a quoted cell is written \"\")") from None
            if header is None:
                raise BatonError(f"{path}: malformed header row on line {line}: {e}") from None
            rows.append((line, Skip("malformed_row", f"{path.name} line {line}: {e}")))
            continue
        if not cells:
            continue                                            # a blank line
        if header is None:
            if not _utf8(cells):
                raise BatonError(f"{path}: the header row is not UTF-8 text; re-save the table as UTF-8")
            header = cells
        elif not _utf8(cells):
            rows.append((line, Skip("undecodable_row", f"{path.name} line {line}: not UTF-8 (re-save the table "
                                                       f"as UTF-8)")))
        elif any(c.strip() for c in cells[len(header):]):
            rows.append((line, Skip("malformed_row", f"{path.name} line {line}: {len(cells)} cells, the header has "
                                                     f"{len(header)} (quote a cell that holds {delimiter!r})")))
        else:
            rows.append((line, {h: (cells[j] if j < len(cells) else None) for j, h in enumerate(header)}))
    if not header:
        raise BatonError(f"{path}: empty table; expected a header row naming the image and caption columns")
    return header, rows


def _utf8(cells: list[str]) -> bool:
    """No byte of the cells failed to decode (surrogateescape turned such bytes into lone surrogates)."""
    try:
        "".join(cells).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
        header, table = iter_parquet(path, (image_col, caption_col))
        rows = ((i + 2, row) for i, row in enumerate(table))    # +1 for the header, +1 for 1-based
    else:
        header, rows = read_table(path, sep)
    for col, flag in ((image_col, "--image-col"), (caption_col, "--caption-col")):
        if col not in header:
            raise BatonError(f"{path}: no column '{col}' (columns: {', '.join(header)}); "
                             f"name the right one with {flag}")
    base = path.parent
    for i, (number, row) in enumerate(rows):
        if isinstance(row, Skip):
            yield row
            continue
        line = f"{path.name} line {number}"
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
