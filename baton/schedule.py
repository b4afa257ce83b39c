"""Learning-rate schedule shared by the training stages: linear warm-up, then cosine decay to 0."""

from __future__ import annotations

import math


def lr_factor(step: int, total: int, warmup: int, schedule: str = "cosine") -> float:
    """Multiplier of the base learning rate at `step` (0-based) of `total`.

    `warmup` steps rise linearly to 1; then "cosine" decays to 0 at `total`, "constant" stays at 1.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
