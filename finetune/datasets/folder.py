"""`folder`: ROOT/<class name>/<image files>, the usual layout of CUB / Cars / SOP exports.

The class split comes from ROOT/split.json ({"train": [names], "test": [names]}) when present;
otherwise a seeded random half of the classes is held out, so runs with the same seed compare.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from baton.errors import BatonError
from baton.images import rgb_on_white
from finetune.datasets import Split, label_items

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}


def _read_class(d: Path) -> list[tuple[Image.Image, str]]:
    out = []
    for f in sorted(d.iterdir()):
        if f.suffix.lower() in IMAGE_EXTS and f.is_file():
            try:
                img = Image.open(f)
                img.load()
            except Exception as e:
                raise BatonError(f"{f}: cannot decode image ({e}); remove or replace it") from None
            out.append((rgb_on_white(img), d.name))
    return out


def load_folder(root: Path, seed: int = 0) -> Split:
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
    train = [p for c in train_c for p in _read_class(root / c)]
    test = [p for c in test_c for p in _read_class(root / c)]
    return Split(label_items(train), label_items(test))
