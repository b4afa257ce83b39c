"""`train.ema_decay`: the finetuned model saved is the weight average its equation gives from the
per-step weights (timm's warm-up schedule, BatchNorm statistics included), a resume keeps the
average exactly, and resuming a run written without an average with one asks for a choice."""

from __future__ import annotations

import pytest
import torch

from baton.checkpoint import load_checkpoint, step_dirs
from baton.errors import BatonError
from conftest import interrupted_after
from test_finetune_precision import assert_resume_equals_uninterrupted, finetune
from test_finetune import setup  # noqa: F401  (setup: the module fixture, shards + handoff)

pytest.importorskip("open_clip")

DECAY = 0.6   # small enough that the warm-up (steps 2, 3) and the cap (from step 4) both act


def test_saved_model_is_the_weight_average_of_its_equation(setup):
    from safetensors.torch import load_file

    root, handoff = setup
    run_dir = finetune(root, handoff, "ema", f"train.ema_decay={DECAY}", "train.checkpoint_every=1",
                       "train.keep_last=0", "train.steps_per_epoch=6")
    per_step = [load_checkpoint(d)[0]["model"] for d in step_dirs(run_dir / "checkpoints")]
    assert len(per_step) == 6
    average: dict[str, torch.Tensor] | None = None
    for k, weights in enumerate(per_step):   # the weights after update k (0-based) and its decay
        d = 0.0 if k <= 1 else min(DECAY, 1 - (1 + (k - 1)) ** (-2 / 3))
        if average is None:
            average = {name: w.clone() for name, w in weights.items()}
        average = {name: d * average[name] + (1 - d) * w if w.is_floating_point() else w.clone()
                   for name, w in weights.items()}
    saved = load_file(str(run_dir / "model" / "model.safetensors"))
    assert saved.keys() == average.keys()
    moved = 0
    for name, want in average.items():
        torch.testing.assert_close(saved[name], want, rtol=1e-5, atol=1e-6, msg=name)
        moved += not torch.equal(saved[name], per_step[-1][name])
    assert moved > len(average) // 2   # the average is not the last weights


def test_resume_with_an_average_equals_uninterrupted(setup):
    from finetune import train as train_mod

    root, handoff = setup
    extra = (f"train.ema_decay={DECAY}", "train.checkpoint_every=2")
    assert_resume_equals_uninterrupted(root, handoff, "ema", *extra)
    # a run written without an average, resumed with one: refused, naming both ways on
    with interrupted_after(train_mod, "lr_factor", 2), pytest.raises(KeyboardInterrupt):
        finetune(root, handoff, "plain_cut", "train.checkpoint_every=2")
    with pytest.raises(BatonError, match="train.ema_decay=0"):
        finetune(root, handoff, "plain_cut", *extra, "resume=latest")
