"""Labelled image datasets for metric learning, by config name (`data.source`).

A loader takes (root, seed) and returns a `Split`: `train` and `test` lists of
`(PIL image, label, class name)`. Test classes are disjoint from train classes (retrieval is
measured on classes never trained on), and labels are contiguous 0..n-1 within each split, in
sorted class-name order, so a split's labels index a classifier/proxy table directly.
Everything is held in memory: the DML datasets used here are thousands of small images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image

from baton.errors import BatonError

Item = tuple[Image.Image, int, str]


@dataclass
class Split:
    train: list[Item]
    test: list[Item]

    def get(self, name: str) -> list[Item]:
        if name not in ("train", "test"):
            raise BatonError(f"unknown split '{name}': use train or test")
        return getattr(self, name)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB on a white background: emoji PNGs are RGBA, and a transparent background would
    otherwise turn black (or random) depending on the decoder."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        bg = Image.new("RGB", img.size, (255, 255, 255))
        bg.paste(img, mask=img.getchannel("A"))
        return bg
    return img.convert("RGB")


def label_items(pairs: list[tuple[Image.Image, str]]) -> list[Item]:
    """Give each class name a contiguous label (sorted name order)."""
    names = sorted({c for _, c in pairs})
    index = {c: i for i, c in enumerate(names)}
    return [(img, index[c], c) for img, c in pairs]


def _loaders() -> dict[str, Callable[[Path, int], Split]]:
    from finetune.datasets.folder import load_folder
    from finetune.datasets.shards import load_shards

    return {"shards": load_shards, "folder": load_folder}


DATASETS = ("shards", "folder")


def load_dataset(source: str, root: str | Path, seed: int = 0) -> Split:
    loaders = _loaders()
    if source not in loaders:
        raise BatonError(f"unknown data.source '{source}'; choose one of: {', '.join(loaders)}")
    root = Path(root)
    if not root.is_dir():
        raise BatonError(f"data.root {root} is not a directory (data.source={source}); "
                         f"create the data first, e.g. `baton shards emoji {root}`, or fix data.root")
    split = loaders[source](root, seed)
    for name in ("train", "test"):
        if not split.get(name):
            raise BatonError(f"{root}: the {name} split is empty (data.source={source})")
    return split
