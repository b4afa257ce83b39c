"""`shards`: a directory with `train/` and `test/` WebDataset shard directories, as written by
`baton shards emoji` (see docs/architecture.md). The class of a sample is its json["class"]."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

from PIL import Image

from baton.errors import BatonError
from baton.images import rgb_on_white
from finetune.datasets import Item, Split, label_items


def read_shard_dir(d: Path) -> list[tuple[Image.Image, str]]:
    """All (image, class name) pairs of one shard directory, in key order (so loading is
    deterministic whatever order the writer used)."""
    import webdataset as wds

    tars = sorted(d.glob("*.tar"))
    if not tars:
        raise BatonError(f"{d}: no .tar shards found (expected shard-000000.tar, ...; "
                         f"write them with `baton shards`)")
    samples = []
    for sample in wds.WebDataset([str(t) for t in tars], shardshuffle=False, empty_check=False):
        key = sample["__key__"]
        raw = sample.get("png", sample.get("jpg", sample.get("jpeg")))
        if raw is None or "json" not in sample:
            raise BatonError(f"{d}: sample {key!r} lacks an image (png/jpg) or json; "
                             f"re-write the shards with `baton shards`")
        meta = json.loads(sample["json"])
        if "class" not in meta:
            raise BatonError(f"{d}: sample {key!r} has no json['class'], which DML needs as its label")
        img = Image.open(io.BytesIO(raw))
        img.load()
        samples.append((sample["__url__"], key, rgb_on_white(img), str(meta["class"])))
    samples.sort(key=lambda s: (s[1], s[0]))
    return [(img, cls) for _, _, img, cls in samples]


def load_shards(root: Path, seed: int = 0) -> Split:
    """`seed` is unused: the split is fixed by the directories."""
    missing = [s for s in ("train", "test") if not (root / s).is_dir()]
    if missing:
        raise BatonError(f"{root}: data.source=shards needs {root}/train/ and {root}/test/ shard "
                         f"directories (missing: {', '.join(missing)}); write them with "
                         f"`baton shards emoji {root}` or use data.source=folder")
    train = read_shard_dir(root / "train")
    test = read_shard_dir(root / "test")
    overlap = {c for _, c in train} & {c for _, c in test}
    if overlap:  # allowed (e.g. same-class retrieval on new images), but not held-out evaluation
        logging.getLogger("baton.finetune").warning(
            "%s: %d classes are in both train/ and test/ (e.g. %r): test metrics are not on held-out "
            "classes", root, len(overlap), sorted(overlap)[0])
    out: tuple[list[Item], list[Item]] = (label_items(train), label_items(test))
    return Split(*out)
