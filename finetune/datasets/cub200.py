"""`cub200`: Caltech-UCSD Birds-200-2011 in its published layout (CUB_200_2011/):

    images.txt              "<image id> <path under images/>"
    image_class_labels.txt  "<image id> <class id 1..200>"
    classes.txt             "<class id> <NNN.Class_Name>"
    images/NNN.Class_Name/*.jpg

The DML split: classes 1-100 train, 101-200 test. Class names are cleaned for language guidance:
"001.Black_footed_Albatross" -> "black footed albatross". Images are decoded when used,
checked when the split is loaded (`image_files`: unreadable ones skipped and counted).
"""

from __future__ import annotations

import re
from pathlib import Path

from baton.errors import BatonError
from finetune.config import MAX_SKIPPED_FRACTION
from finetune.datasets import Split, label_by_id, read_table
from finetune.datasets.image_files import checked_split

TRAIN_CLASSES = range(1, 101)


def clean_name(raw: str) -> str:
    return re.sub(r"^\d+\.", "", raw).replace("_", " ").strip().lower()


def load_cub200(root: Path, seed: int = 0, max_skipped_fraction: float | None = MAX_SKIPPED_FRACTION) -> Split:
    """`seed` is unused: the split is the published one."""
    if not (root / "images.txt").is_file() and (root / "CUB_200_2011" / "images.txt").is_file():
        root = root / "CUB_200_2011"
    paths = {i: p for i, p in read_table(root / "images.txt", 2)}
    labels = {i: int(c) for i, c in read_table(root / "image_class_labels.txt", 2)}
    names = {int(c): clean_name(n) for c, n in read_table(root / "classes.txt", 2)}
    rows = {"train": [], "test": []}
    for img_id, rel in paths.items():
        if img_id not in labels or labels[img_id] not in names:
            raise BatonError(f"{root}: image {img_id} ({rel}) has no class in image_class_labels.txt/classes.txt")
        cid = labels[img_id]
        rows["train" if cid in TRAIN_CLASSES else "test"].append((root / "images" / rel, cid, names[cid]))
    rows = checked_split(rows, root, max_skipped_fraction)   # unreadable files skipped and counted
    return Split(label_by_id(rows["train"]), label_by_id(rows["test"]))
