"""img2dataset output, re-sharded: its webdataset tars (`00000.tar` with `KEY.jpg`, `KEY.txt`,
`KEY.json`) or its `files` layout (`00000/KEY.jpg`, `KEY.txt`, `KEY.json`).

Captions and json fields are read while planning (they are small); image bytes are read by the
shard workers straight from the tar (by offset) or the file, then go through the usual checks
and options. The json fields img2dataset wrote (url, width, sha256, ...) are kept in key.json.
Tars are visited in name order and members in tar order, so the same input gives the same shards.
"""

from __future__ import annotations

import argparse
import json
import tarfile
from pathlib import Path
from typing import Any, Iterator

from baton.errors import BatonError
from data_prep import options
from data_prep.items import Item
from data_prep.writer import Skip

NAME = "img2dataset"
HELP = "re-shard an img2dataset output folder (its .tar shards or its files layout); json fields kept"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _split(name: str) -> tuple[str, str]:
    """(key, extension) the webdataset way: the key ends at the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _sample(key: str, parts: dict[str, Any], where: str) -> Item | Skip:
    """An Item from one sample's parts: ext -> (source, offset, size) for the image, bytes for
    txt/json."""
    image_ext = next((e for e in IMAGE_EXTS if e in parts), None)
    if image_ext is None:
        return Skip("missing_image", f"{where}: {key}")
    fields: dict[str, Any] = {}
    if "json" in parts:
        try:
            fields = json.loads(parts["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return Skip("bad_json", f"{where}: {key}.json")
        if not isinstance(fields, dict):
            fields = {"json": fields}
    try:
        caption = parts["txt"].decode("utf-8").strip() if "txt" in parts else str(fields.get("caption") or "")
    except UnicodeDecodeError:
        return Skip("non_utf8_caption", f"{where}: {key}.txt")
    if not caption.strip():
        return Skip("empty_caption", f"{where}: {key}")
    source, offset, size = parts[image_ext]
    meta = {"captions": [], **fields, "source": f"{where}/{key}.{image_ext}"}
    meta["class"] = fields.get("class") or caption
    return Item(key=key.replace("/", "_"), caption=caption, meta=meta, source=source, offset=offset, size=size)


def _iter_tar(path: Path, root: Path) -> Iterator[Item | Skip]:
    where = path.relative_to(root).as_posix()
    current, parts = None, {}
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = _split(m.name)
                if key != current:
                    if current is not None:
                        yield _sample(current, parts, where)
                    current, parts = key, {}
                if ext in IMAGE_EXTS:
                    parts[ext] = (str(path), m.offset_data, m.size)
                elif ext in ("txt", "json"):
                    parts[ext] = tf.extractfile(m).read()
    except (tarfile.TarError, OSError) as e:
        yield Skip("unreadable_tar", f"{where}: {e}")
        return  # the samples before the damage were yielded; the partial last one is not
    if current is not None:
        yield _sample(current, parts, where)


def _iter_files(root: Path) -> Iterator[Item | Skip]:
    groups: dict[str, dict[str, Any]] = {}
    for p in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        rel = p.relative_to(root).as_posix()
        key, ext = _split(rel)
        if ext in IMAGE_EXTS:
            groups.setdefault(key, {})[ext] = (str(p), 0, None)
        elif ext in ("txt", "json") and "/" in rel:  # the top level holds img2dataset's own stats
            try:
                groups.setdefault(key, {})[ext] = p.read_bytes()
            except OSError:
                continue
    for key in sorted(groups):
        folder = key.rpartition("/")[0]
        yield _sample(key.rpartition("/")[2], groups[key], folder)


def iter_records(root: str | Path) -> Iterator[Item | Skip]:
    root = Path(root)
    if not root.is_dir():
        raise BatonError(f"img2dataset output folder not found: {root} (pass the folder img2dataset wrote)")
    tars = sorted(root.rglob("*.tar"))
    if tars:
        for path in tars:
            yield from _iter_tar(path, root)
    else:
        yield from _iter_files(root)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", metavar="ROOT", help="img2dataset output folder (webdataset or files format)")
    options.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    root = Path(args.root)
    first = next(iter_records(root), None)  # a wrong ROOT fails here, before --out is touched
    if first is None:
        raise BatonError(f"{root} holds no img2dataset samples (expected *.tar shards or "
                         f"NNNNN/KEY.jpg + KEY.txt + KEY.json)")
    options.run_source(lambda: iter_records(root), args, f"img2dataset {root} -> {args.out}", str(root))
    return 0
