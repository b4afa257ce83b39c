"""Folder source: ROOT/<class name>/<image files> (any depth below the class folder).

The class is the top-level folder name and the caption is that name with underscores as spaces,
the layout of ImageFolder-style datasets (CUB, Cars, SOP exports). Files are visited in sorted
order so the same tree always gives the same shards.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator

from baton.errors import BatonError
from data_prep.images import IMAGE_EXTENSIONS, SkipSample, load_image
from data_prep.writer import Sample, Skip, print_summary, write_shards

NAME = "folder"
HELP = "ROOT/<class name>/<images>: caption = class name (underscores as spaces)"


def class_folders(root: Path) -> list[Path]:
    """The class folders under `root`; a BatonError if `root` is missing or has none."""
    if not root.exists():
        raise BatonError(f"input folder not found: {root} (pass ROOT containing one sub-folder per class)")
    if not root.is_dir():
        raise BatonError(f"{root} is not a folder (pass ROOT containing one sub-folder per class)")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise BatonError(f"{root} has no class sub-folders: expected ROOT/<class name>/<image files>")
    return folders


def iter_records(root: str | Path, size: int | None = None) -> Iterator[Sample | Skip]:
    """One Sample per decodable image; Skip for files that are not images or do not decode."""
    root = Path(root)
    folders = class_folders(root)
    for path in sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")):
        yield Skip("outside_class_folder", str(path))
    for folder in folders:
        class_name = folder.name
        caption = class_name.replace("_", " ").strip()
        files = sorted(p for p in folder.rglob("*")
                       if not any(part.startswith(".") for part in p.relative_to(folder).parts)
                       and not p.is_dir())
        for path in files:
            rel = path.relative_to(root).as_posix()
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                yield Skip("not_an_image_extension", rel)
                continue
            try:
                data, ext = load_image(path, size)
            except SkipSample as e:
                yield Skip(e.reason, e.detail or rel)
                continue
            yield Sample(key=f"{class_name}_{path.relative_to(folder).with_suffix('').as_posix()}",
                         image=data, ext=ext, caption=caption,
                         meta={"class": class_name, "source": rel, "captions": []})


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", metavar="ROOT", help="folder with one sub-folder of images per class")
    p.add_argument("--out", required=True, help="output shard directory")
    p.add_argument("--shard-size", type=int, default=500, help="samples per shard (default 500)")
    p.add_argument("--size", type=int, default=None,
                   help="resize so the shorter side is SIZE and store PNG (default: keep original bytes)")


def run(args: argparse.Namespace) -> int:
    root = Path(args.root)
    class_folders(root)  # fail early, before touching --out, on a wrong ROOT
    stats = write_shards(iter_records(root, args.size), args.out, args.shard_size, log=sys.stdout)
    print_summary(stats, f"folder {root} -> {args.out}")
    if stats["written"] == 0:
        raise BatonError(f"no decodable images under {root}; nothing was written (see the skipped counts)")
    return 0
