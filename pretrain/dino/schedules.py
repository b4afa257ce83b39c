"""DINO's schedules as pure functions of the global step, so a resumed run recomputes them exactly.

Semantics of facebookresearch/dino `utils.cosine_scheduler` (without warm-up): over `total` steps,
value(step) = final + (base - final) * (1 + cos(pi * step / total)) / 2, so step 0 gives `base`
and the value approaches `final` at the end. The teacher temperature follows main_dino.py's
`DINOLoss.teacher_temp_schedule`: per *epoch*, `np.linspace(warmup, final, warmup_epochs)` then
`final`. "Epoch" is `step // steps_per_epoch`, as the engine counts it.
"""

from __future__ import annotations

import math


def cosine(base: float, final: float, step: int, total: int) -> float:
    """`base` at step 0, cosine towards `final` at step `total` (clamped beyond)."""
    progress = min(max(step, 0), total) / max(1, total)
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * progress))


def epoch_of(step: int, steps_per_epoch: int) -> int:
    return step // max(1, steps_per_epoch)


def teacher_temperature(step: int, steps_per_epoch: int, warmup_temp: float, final_temp: float,
                        warmup_epochs: int) -> float:
    """Linear warm-up from `warmup_temp` to `final_temp` over `warmup_epochs` epochs (np.linspace's
    points: epoch e of n gives warmup + (final - warmup) * e / (n - 1)), then `final_temp`."""
    epoch = epoch_of(step, steps_per_epoch)
    if epoch >= warmup_epochs:
        return final_temp
    if warmup_epochs == 1:
        return warmup_temp
    return warmup_temp + (final_temp - warmup_temp) * epoch / (warmup_epochs - 1)


def teacher_momentum(step: int, total: int, base: float) -> float:
    """EMA momentum of the teacher: cosine from `base` (0.996) to 1."""
    return cosine(base, 1.0, step, total)


def weight_decay(step: int, total: int, base: float, final: float) -> float:
    """Weight decay of the regularised parameters: cosine from `base` (0.04) to `final` (0.4)."""
    return cosine(base, final, step, total)


def last_layer_frozen(step: int, steps_per_epoch: int, freeze_epochs: int) -> bool:
    """True during the first `freeze_epochs` epochs (utils.cancel_gradients_last_layer)."""
    return epoch_of(step, steps_per_epoch) < freeze_epochs
