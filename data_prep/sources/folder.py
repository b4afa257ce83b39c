"""Folder source: ROOT/<class name>/<image files> (any depth below the class folder).

The class is the top-level folder name and the caption is that name with underscores as spaces,
the layout of ImageFolder-style datasets (CUB, Cars, SOP exports). Files are visited in sorted
order so the same tree always gives the same shards. Files without an image extension are
skipped while planning; everything else is read and checked by the shard workers.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterator

from baton.errors import BatonError
from data_prep import options
from data_prep.images import IMAGE_EXTENSIONS
from data_prep.items import Item
from data_prep.writer import Skip

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


def iter_records(root: str | Path) -> Iterator[Item | Skip]:
    """One Item per file with an image extension; Skip for the other files."""
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
            yield Item(key=f"{class_name}_{path.relative_to(folder).with_suffix('').as_posix()}",
                       caption=caption, source=str(path),
                       meta={"class": class_name, "source": rel, "captions": []})


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", metavar="ROOT", help="folder with one sub-folder of images per class")
    options.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    root = Path(args.root)
    class_folders(root)  # fail early, before touching --out, on a wrong ROOT
    options.run_source(lambda: iter_records(root), args, f"folder {root} -> {args.out}", f"{root}")
    return 0
