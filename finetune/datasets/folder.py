"""`folder`: ROOT/<class name>/<image files>, the usual layout of CUB / Cars / SOP exports.

The class split comes from ROOT/split.json ({"train": [names], "test": [names]}) when present;
otherwise a seeded random half of the classes is held out, so runs with the same seed compare.
Each file named as an image is read and decoded when the split is loaded; one that cannot be is
skipped and counted (`image_files`: past `data.max_skipped_fraction` of a split, an error).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from baton.errors import BatonError
from finetune.config import MAX_SKIPPED_FRACTION
from finetune.datasets import Split, label_items
from finetune.datasets.image_files import checked_split

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}


def _class_files(d: Path) -> list[tuple[Path, str]]:
    """(file, class) of each entry of `d` named as an image, folders aside (as `baton shards folder`
    looks past them); whether it reads and decodes is checked with the other files of its split
    (`image_files`: a FIFO or a symlink loop is counted there, never opened)."""
    return [(f, d.name) for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_EXTS and not f.is_dir()]


def load_folder(root: Path, seed: int = 0, max_skipped_fraction: float | None = MAX_SKIPPED_FRACTION) -> Split:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise BatonError(f"{root}: data.source=folder needs ROOT/<class name>/<images> with at least "
                         f"2 class directories, found {len(classes)}")
    split_file = root / "split.json"
    if split_file.is_file():
        try:
            spec = json.loads(split_file.read_text())
            train_c, test_c = list(spec["train"]), list(spec["test"])
        except (ValueError, KeyError, TypeError) as e:
            raise BatonError(f"{split_file}: expected {{\"train\": [class names], \"test\": [class names]}} "
                             f"({e})") from None
        unknown = sorted(set(train_c + test_c) - set(classes))
        if unknown:
            raise BatonError(f"{split_file}: names classes with no directory under {root}: "
                             f"{', '.join(unknown[:5])}")
        if set(train_c) & set(test_c):
            raise BatonError(f"{split_file}: train and test share classes; they must be disjoint")
    else:
        order = np.random.default_rng(seed).permutation(len(classes))
        half = len(classes) // 2
        train_c = [classes[i] for i in sorted(order[:len(classes) - half])]
        test_c = [classes[i] for i in sorted(order[len(classes) - half:])]
    files = {"train": [p for c in train_c for p in _class_files(root / c)],
             "test": [p for c in test_c for p in _class_files(root / c)]}
    images = checked_split(files, root, max_skipped_fraction, keep_pixels=True)
    return Split(label_items(images["train"]), label_items(images["test"]))
