"""`sop`: Stanford Online Products in its published layout (Stanford_Online_Products/):

    Ebay_train.txt / Ebay_test.txt   header "image_id class_id super_class_id path", then rows
                                     "1 1 1 bicycle_final/111085122871_0.JPG"

Train and test are the two files (11,318 / 11,316 products). A product has no name, so its name
for language guidance is its super-class, from the path's directory: "bicycle_final" -> "bicycle".
Images are decoded when used (120k photos), checked when the split is loaded (`image_files`:
unreadable ones skipped and counted).
"""

from __future__ import annotations

from pathlib import Path

from finetune.config import MAX_SKIPPED_FRACTION
from finetune.datasets import Split, label_by_id, read_table
from finetune.datasets.image_files import checked_split


def super_class_name(rel_path: str) -> str:
    return rel_path.split("/")[0].removesuffix("_final").replace("_", " ")


def _read(root: Path, name: str):
    return [(root / path, int(cid), super_class_name(path)) for _, cid, _, path in
            (r[:4] for r in read_table(root / name, 4, header=True))]


def load_sop(root: Path, seed: int = 0, max_skipped_fraction: float | None = MAX_SKIPPED_FRACTION) -> Split:
    """`seed` is unused: the split is the published one."""
    if not (root / "Ebay_train.txt").is_file() and (root / "Stanford_Online_Products" / "Ebay_train.txt").is_file():
        root = root / "Stanford_Online_Products"
    rows = checked_split({"train": _read(root, "Ebay_train.txt"), "test": _read(root, "Ebay_test.txt")}, root,
                         max_skipped_fraction)   # unreadable files skipped and counted
    return Split(label_by_id(rows["train"]), label_by_id(rows["test"]))
