"""The one rule for a labelled set that lost inputs: skip and count, and fail past a fraction.

Every reader of a labelled set skips a bad input (undecodable image, no class, unreadable file,
truncated shard) with a warning naming it and counts it by reason, instead of stopping at the
first: labelled shards (`pretrain.data.labelled`: finetuning's `shards` source, `baton evaluate`,
pretraining's `clip.eval.shards` / `glip.eval.shards` and `dino.knn_shards`) and finetuning's file sources (class folders,
CUB200, CARS196, SOP: `finetune.datasets.image_files`). But a set that silently shrank gives wrong
results (a training set short of a tenth of its classes, metrics on a different test set), so once
more than a fraction of what should have been read was skipped or lost, the reader fails, naming
the worst places (shards or files) and the key that sets the limit (`data.max_skipped_fraction`,
`clip.eval.max_skipped_fraction`).
"""

from __future__ import annotations

from collections import Counter
from typing import Collection, Mapping, Optional

from baton.errors import BatonError

# The default limit (`data.max_skipped_fraction`, `clip.eval.max_skipped_fraction`, `baton evaluate
# --max-skipped-fraction`): a labelled set with more than 1 % of its samples skipped or lost is
# broken, not unlucky.
MAX_SKIPPED_FRACTION = 0.01


def skipped_fraction(skipped: Mapping[str, int], read: int, lost: int = 0, uncounted: Collection[str] = ()) -> float:
    """Inputs skipped or lost over the inputs there should have been (read + lost). Reasons in
    `uncounted` are reported but are no input each: a shard-level event whose missing samples are
    in `lost`, or a file that is not an input at all."""
    bad = sum(n for reason, n in skipped.items() if reason not in uncounted) + lost
    return bad / max(1, read + lost)


def check_skipped(skipped: Mapping[str, int], read: int, bad_by_place: Counter, max_fraction: Optional[float],
                  where: str, fraction_key: str, remedy: str, lost: int = 0, uncounted: Collection[str] = ()) -> None:
    """Raise `BatonError` naming the worst places when more than `max_fraction` of the inputs were
    skipped or lost (None: no limit); at or below it the skips stay counted and logged."""
    if max_fraction is None or not (skipped or lost):
        return
    fraction = skipped_fraction(skipped, read, lost, uncounted)
    if fraction <= max_fraction:
        return
    worst = ", ".join(f"{place} ({n})" for place, n in bad_by_place.most_common(3))
    raise BatonError(f"{where}: {fraction:.1%} of the samples were skipped or lost, more than {max_fraction} "
                     f"({fraction_key}); by reason: {dict(sorted(skipped.items()))}; most in {worst}. {remedy}")
