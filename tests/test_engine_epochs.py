"""Steps per epoch are counted once, by the engine (`pretrain.data.run_steps_per_epoch`), and every
method's epochs follow that count (`PretrainMethod.steps_per_epoch`)."""

from types import SimpleNamespace

import pytest
import torch

from baton.distributed import DistInfo
from baton.errors import BatonError
from pretrain.data import run_steps_per_epoch


def _cfg(num_samples, batch_size, grad_accum=1, **section):
    return SimpleNamespace(data=SimpleNamespace(num_samples=num_samples, batch_size=batch_size, train_shards=None),
                           train=SimpleNamespace(grad_accum=grad_accum), **section)


def test_the_engine_counts_optimiser_steps_over_ranks_and_micro_batches():
    assert run_steps_per_epoch(_cfg(100, 8), world_size=1) == (100, 12)
    assert run_steps_per_epoch(_cfg(100, 8, grad_accum=2), world_size=2) == (100, 3)   # 100 // 16 // 2
    with pytest.raises(BatonError, match="fewer than train.grad_accum=4 batches"):
        run_steps_per_epoch(_cfg(40, 8, grad_accum=4), world_size=2)


def test_dino_epochs_follow_the_count_the_engine_hands_it():
    """The engine sets `epoch_steps`; DINO's teacher-temperature warm-up counts epochs in it (its own
    reading of the config would give 8 steps per epoch here, so step 7 would still be epoch 0)."""
    from test_dino import random_crops, tiny_config

    from pretrain.dino.method import DinoMethod

    m = DinoMethod(_cfg(64, 8, dino=tiny_config(warmup_teacher_temp=0.04, teacher_temp=0.06,
                                                 warmup_teacher_temp_epochs=3)), DistInfo())
    assert m.steps_per_epoch() == 8                   # without an engine: the same rule, computed
    m.epoch_steps = 3                                 # what pretrain/train.py sets from its own count
    model = m.build_model()
    crops = random_crops(m.dino, 4)
    with torch.no_grad():
        _, extra = m.loss(model, crops + (["k"] * 4,), 7, 100)     # step 7 // 3 = epoch 2 of 3
    assert extra["teacher_temp"] == pytest.approx(0.06)
