"""`cars196`: Stanford Cars in its published layout: `cars_annos.mat` (read with scipy.io) beside
`car_ims/`. Each annotation has `relative_im_path` ("car_ims/000001.jpg") and `class` (1..196);
`class_names` names the classes ("AM General Hummer SUV 2000"), used as they are for language
guidance. The DML split: classes 1-98 train, 99-196 test (the annotations' own train/test flag is
the classification split and is ignored). Images are decoded when used,
checked when the split is loaded (`image_files`: unreadable ones skipped and counted).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from baton.errors import BatonError
from finetune.config import MAX_SKIPPED_FRACTION
from finetune.datasets import Split, label_by_id
from finetune.datasets.image_files import checked_split

TRAIN_CLASSES = range(1, 99)


def _str(x) -> str:
    return str(np.asarray(x).squeeze())


def load_cars196(root: Path, seed: int = 0, max_skipped_fraction: float | None = MAX_SKIPPED_FRACTION) -> Split:
    """`seed` is unused: the split is the published one."""
    from scipy.io import loadmat

    mat_path = root / "cars_annos.mat"
    if not mat_path.is_file():
        raise BatonError(f"{mat_path} is missing: data.source=cars196 expects cars_annos.mat and car_ims/ in {root}")
    try:
        mat = loadmat(str(mat_path))
        annos, class_names = mat["annotations"].ravel(), mat["class_names"].ravel()
        names = {i + 1: _str(n) for i, n in enumerate(class_names)}
        rows = {"train": [], "test": []}
        for a in annos:
            cid = int(np.asarray(a["class"]).squeeze())
            rows["train" if cid in TRAIN_CLASSES else "test"].append(
                (root / _str(a["relative_im_path"]), cid, names[cid]))
    except (KeyError, ValueError, IndexError, TypeError) as e:
        raise BatonError(f"{mat_path}: not the Stanford Cars annotation file (needs annotations with "
                         f"relative_im_path and class, and class_names): {e!r}") from None
    rows = checked_split(rows, root, max_skipped_fraction)   # unreadable files skipped and counted
    return Split(label_by_id(rows["train"]), label_by_id(rows["test"]))
