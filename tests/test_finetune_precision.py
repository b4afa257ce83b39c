"""`train.precision` in finetuning: bf16 autocast on CPU takes effect (the backbone's matmuls and
convolutions run in bf16, the weights stay fp32), the loss follows fp32 to bf16 accuracy, a resume
stays exact, and precisions a CPU cannot run are refused by name."""

from __future__ import annotations

import json

import pytest
import torch

from baton.config import load_config
from baton.errors import BatonError
from conftest import interrupted_after
from test_finetune import overrides, setup  # noqa: F401  (setup: the module fixture, shards + handoff)

pytest.importorskip("open_clip")


COMMON = ("train.epochs=1", "train.steps_per_epoch=4", "train.log_every=1", "train.eval_at_end=false",
          "data.workers=0")


def losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def finetune(root, handoff, name, *extra):
    from finetune.config import FinetuneConfig
    from finetune.train import run

    run(load_config(FinetuneConfig, None, overrides(root, handoff, name, *COMMON, *extra)))
    return root / name


def test_bf16_autocast_takes_effect_and_follows_fp32(setup):
    from safetensors.torch import load_file

    root, handoff = setup
    out_dtypes: set[torch.dtype] = set()

    def record(module, args, out):
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and torch.is_grad_enabled():
            out_dtypes.add(out.dtype)

    fp32 = finetune(root, handoff, "fp32", "train.precision=fp32")
    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        bf16 = finetune(root, handoff, "bf16", "train.precision=bf16")
    finally:
        handle.remove()
    assert out_dtypes == {torch.bfloat16}, out_dtypes   # every training forward layer ran in bf16

    a, b = losses(fp32), losses(bf16)
    assert len(a) == len(b) == 4
    assert a != b                                          # the precision changed the numbers ...
    assert b == pytest.approx(a, rel=3e-2)                 # ... by bf16 rounding, no more
    wa = load_file(str(fp32 / "model" / "model.safetensors"))
    wb = load_file(str(bf16 / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wb[k].dtype == wa[k].dtype                  # the weights themselves stay fp32
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=5e-3, msg=k)


def assert_resume_equals_uninterrupted(root, handoff, name: str, *extra: str) -> None:
    """A finetuning stopped after 2 of its 4 steps and resumed saves the model, bit for bit, that
    the same run uninterrupted saves."""
    from safetensors.torch import load_file

    from finetune import train as train_mod

    full = finetune(root, handoff, f"{name}_full", *extra)
    with interrupted_after(train_mod, "lr_factor", 2), pytest.raises(KeyboardInterrupt):
        finetune(root, handoff, f"{name}_cut", *extra)
    cut = finetune(root, handoff, f"{name}_cut", *extra, "resume=latest")
    a = load_file(str(full / "model" / "model.safetensors"))
    b = load_file(str(cut / "model" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


def test_bf16_resume_equals_uninterrupted(setup):
    root, handoff = setup
    assert_resume_equals_uninterrupted(root, handoff, "bf16", "train.precision=bf16", "train.checkpoint_every=2")


@pytest.mark.parametrize("value, match", [("fp16", "needs a CUDA GPU"), ("half", r"unknown train.precision 'half': choose one of auto, fp32, bf16, fp16$")])
def test_precision_refused_by_name(setup, value, match):
    root, handoff = setup
    with pytest.raises(BatonError, match=match):
        finetune(root, handoff, f"bad_{value}", f"train.precision={value}", "train.device=cpu")
