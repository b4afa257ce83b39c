"""Labelled image datasets for metric learning, by config name (`data.source`).

A loader takes (root, seed, the share of bad samples it skips before failing) and returns a
`Split` (the `shards` loader's root may be a URL): `train` and `test` lists of
`(image, label, class name)`, where the image is a PIL image or, for the published benchmarks
(CUB200, CARS196, SOP: tens of thousands of full-size photos), the Path of its file, decoded only
when used (`load_image`). Test classes are disjoint from train classes (retrieval is
measured on classes never trained on), and labels are contiguous 0..n-1 within each split, in
sorted class-name order, so a split's labels index a classifier/proxy table directly.
The small datasets (emoji shards, class folders) are held in memory as decoded images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from PIL import Image

from baton.errors import BatonError
from baton.images import rgb_on_white
from baton.registry import Registry, unknown_name
from finetune.config import MAX_SKIPPED_FRACTION

Item = tuple["Image.Image | Path", int, str]


@dataclass
class Split:
    train: list[Item]
    test: list[Item]

    def get(self, name: str) -> list[Item]:
        if name not in ("train", "test"):
            raise unknown_name("split", name, ("train", "test"))
        return getattr(self, name)


def load_image(image: "Image.Image | Path | str") -> Image.Image:
    """A PIL image as is; a path decoded to RGB on white (`baton.images`; a BatonError naming the
    file if it cannot be)."""
    if isinstance(image, Image.Image):
        return image
    try:
        with Image.open(image) as f:
            f.load()
            return rgb_on_white(f)
    except (OSError, ValueError) as e:
        raise BatonError(f"{image}: cannot decode image ({e}); remove or replace it") from None


def label_items(pairs: list[tuple["Image.Image | Path", str]]) -> list[Item]:
    """Give each class name a contiguous label (sorted name order)."""
    names = sorted({c for _, c in pairs})
    index = {c: i for i, c in enumerate(names)}
    return [(img, index[c], c) for img, c in pairs]


def label_by_id(rows: list[tuple[Path, int, str]]) -> list[Item]:
    """(path, class id, class name) rows -> items with labels contiguous in class-id order (the
    published benchmarks number their classes; names need not be unique, e.g. SOP super-classes)."""
    index = {cid: i for i, cid in enumerate(sorted({cid for _, cid, _ in rows}))}
    return [(path, index[cid], name) for path, cid, name in rows]


def read_table(path: Path, columns: int, header: bool = False) -> list[list[str]]:
    """Whitespace-separated rows with at least `columns` fields (the benchmarks' .txt files)."""
    if not path.is_file():
        raise BatonError(f"{path} is missing: expected the dataset's published layout there")
    rows = [ln.split() for ln in path.read_text().splitlines()[1 if header else 0:] if ln.strip()]
    bad = [i for i, r in enumerate(rows) if len(r) < columns]
    if bad:
        raise BatonError(f"{path}: line {bad[0] + 1 + header} has fewer than {columns} fields")
    return rows


# data.source -> loader(root, seed) -> Split, imported when chosen (one file per source)
DATASETS = Registry("data.source", {
    "shards": "finetune.datasets.shards:load_shards",
    "folder": "finetune.datasets.folder:load_folder",
    "cub200": "finetune.datasets.cub200:load_cub200",
    "cars196": "finetune.datasets.cars196:load_cars196",
    "sop": "finetune.datasets.sop:load_sop",
})


def load_dataset(source: str, root: str | Path, seed: int = 0,
                 max_skipped_fraction: float | None = MAX_SKIPPED_FRACTION) -> Split:
    """The split of `source` at `root`. `max_skipped_fraction` is the share of bad samples (shards)
    or files (the other sources) a split may lose, skipped and counted, before loading fails
    (`data.max_skipped_fraction`, `baton.skips`)."""
    loader = DATASETS[source]
    if "://" not in str(root) and not Path(root).is_dir():
        raise BatonError(f"data.root {root} is not a directory (data.source={source}); "
                         f"create the data first, e.g. `baton shards emoji {root}`, or fix data.root")
    # shards read through fsspec (their root may be a URL); every source skips and counts bad samples
    split = loader(str(root) if source == "shards" else Path(root), seed, max_skipped_fraction)
    for name in ("train", "test"):
        if not split.get(name):
            raise BatonError(f"{root}: the {name} split is empty (data.source={source})")
    return split
