"""`shards`: a directory (local, or an http(s)/s3 URL) with `train/` and `test/` WebDataset shard
directories, as written by `baton shards emoji` (see docs/architecture.md). The class of a sample
is its json["class"].

Both splits are read by pretraining's labelled-shard reader (`pretrain.data.labelled`), so the
held-out shards give the same samples, in the same order (shard order), as in pretraining's
evaluation. A bad sample (undecodable image, no class, bad json) or a truncated shard is skipped
and counted with a warning naming the shard; more than `data.max_skipped_fraction` of a split
skipped or lost is an error naming the worst shards, never a silently smaller training set.
"""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image

from baton.errors import BatonError
from finetune.config import MAX_SKIPPED_FRACTION
from finetune.datasets import Split, label_items
from pretrain.data.labelled import read_labelled

log = logging.getLogger("baton.finetune")
# where a user sets the limit, named in the error
LIMIT_SETTINGS = "data.max_skipped_fraction; `baton evaluate --max-skipped-fraction`"


def read_shard_split(root: str, split: str, max_skipped_fraction: float | None = MAX_SKIPPED_FRACTION
                     ) -> list[tuple[Image.Image, str]]:
    """(RGB image, class name) of every usable sample of ROOT/SPLIT/, in shard order."""
    data = read_labelled(f"{root.rstrip('/')}/{split}/", key="data.root", caption_required=False,
                         class_required=True)
    where = f"data.root={root} ({split}/)"
    images = data.decode_owned()
    data.check_skipped(max_skipped_fraction, where, LIMIT_SETTINGS)
    if data.skipped:
        log.warning("%s: %d samples kept, skipped by reason: %s", where, len(images), dict(sorted(data.skipped.items())))
    return [(img, s.label) for s, img in images]


def load_shards(root: str | Path, seed: int = 0, max_skipped_fraction: float | None = MAX_SKIPPED_FRACTION) -> Split:
    """`seed` is unused: the split is fixed by the directories."""
    root = str(root)
    if "://" not in root:
        missing = [s for s in ("train", "test") if not (Path(root) / s).is_dir()]
        if missing:
            raise BatonError(f"{root}: data.source=shards needs {root}/train/ and {root}/test/ shard "
                             f"directories (missing: {', '.join(missing)}); write them with "
                             f"`baton shards emoji {root}` or use data.source=folder")
    train = read_shard_split(root, "train", max_skipped_fraction)
    test = read_shard_split(root, "test", max_skipped_fraction)
    overlap = {c for _, c in train} & {c for _, c in test}
    if overlap:  # allowed (e.g. same-class retrieval on new images), but not held-out evaluation
        log.warning("%s: %d classes are in both train/ and test/ (e.g. %r): test metrics are not on held-out "
                    "classes", root, len(overlap), sorted(overlap)[0])
    return Split(label_items(train), label_items(test))
