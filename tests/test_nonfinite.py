"""`train.max_nonfinite_steps`: a step whose loss is not finite is skipped (nothing of it applied,
its buffers put back), counted, logged and saved, up to the bound; one more stops the run naming
the steps and the last good checkpoint. The poison is a loss multiplied by NaN at a chosen step
(what `optim.lr=1e30` or an overflowing sample gives); the reference is the same run with the
optimiser's update of that step left out (torch's AdamW.step made a no-op for that one call), so
a skipped step must equal "that batch's update never happened", and nothing else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from baton.checkpoint import load_checkpoint
from baton.config import load_config
from baton.errors import BatonError
from test_pretrain import write_tiny_config

POISONED = 3      # the 1-based step whose loss is made NaN
STEPS = 5


def poison_method_loss(monkeypatch, method_cls, steps: set[int], ranks: set[int] | None = None) -> None:
    """The method's loss times NaN at the given 1-based steps (on `ranks` only, if given)."""
    real = method_cls.loss

    def loss(self, net, batch, step, total):
        value, extras = real(self, net, batch, step, total)
        if step + 1 in steps and (ranks is None or self.info.rank in ranks):
            value = value * float("nan")
        return value, extras

    monkeypatch.setattr(method_cls, "loss", loss)


def drop_update(monkeypatch, step: int, optimizer_cls=torch.optim.AdamW) -> list[int]:
    """The reference: the optimiser steps of `step` (1-based) do nothing, as if its batch were left
    out of the update. Returns the counter of finished steps the caller advances (DeepSpeed's ZeRO
    calls the optimiser once per parameter group, so calls are not steps)."""
    real, done = optimizer_cls.step, [0]

    def patched(self, *a, **kw):
        if done[0] + 1 == step:
            return None
        return real(self, *a, **kw)

    monkeypatch.setattr(optimizer_cls, "step", patched)
    return done


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    def full(t):
        return t.full_tensor() if hasattr(t, "full_tensor") else t
    return {k: full(v).detach().clone() for k, v in model.state_dict().items()}


def run_pretrain(cfg_path: Path, run: Path, *overrides: str, done: list[int] | None = None
                 ) -> tuple[int, dict[int, dict]]:
    """Train; the state after every step, and `done[0]` = the last finished step."""
    from pretrain.config import PretrainConfig
    from pretrain.train import train

    states: dict[int, dict] = {}
    done = [0] if done is None else done

    def on_step(step, model):
        states[step] = snapshot(model)
        done[0] = step

    cfg = load_config(PretrainConfig, str(cfg_path), [f"run_dir={run}", *overrides])
    return train(cfg, on_step=on_step), states


def assert_equal_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", pytest.param("deepspeed", marks=pytest.mark.slow)])
def test_a_nonfinite_step_is_skipped_and_training_goes_on_as_without_its_update(strategy, tmp_path, synthetic_shards,
                                                                               monkeypatch):
    from pretrain.clip.method import ClipMethod

    cfg = write_tiny_config(tmp_path / "c.yaml", tmp_path / "unused", synthetic_shards,
                            train={"max_steps": STEPS, "checkpoint_every": STEPS, "strategy": strategy})
    with monkeypatch.context() as m:
        assert run_pretrain(cfg, tmp_path / "reference", done=drop_update(m, POISONED))[0] == 0
    reference = load_checkpoint(tmp_path / "reference")
    with monkeypatch.context() as m:
        poison_method_loss(m, ClipMethod, {POISONED})
        code, states = run_pretrain(cfg, tmp_path / "skip", "train.max_nonfinite_steps=1")
    assert code == 0
    assert_equal_states(states[POISONED], states[POISONED - 1])   # the skipped step changed nothing
    from pretrain.strategies import full_model_state

    state, meta = load_checkpoint(tmp_path / "skip")
    assert state["step"] == STEPS and state["nonfinite_steps"] == [POISONED]
    assert_equal_states(full_model_state(meta["path"], state), full_model_state(reference[1]["path"], reference[0]))
    rows = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "nonfinite_steps" in r] == [POISONED]
    assert POISONED not in [r["step"] for r in rows if "loss" in r]   # no NaN loss row
    assert "not finite at step 3" in (tmp_path / "skip" / "log.txt").read_text()


def test_the_bound_holds_across_resumes_and_one_more_stops_naming_the_steps(tmp_path, synthetic_shards,
                                                                            monkeypatch, capsys):
    from baton.cli import main as cli_main
    from pretrain.clip.method import ClipMethod

    run = tmp_path / "run"
    cfg = write_tiny_config(tmp_path / "c.yaml", run, synthetic_shards, train={"checkpoint_every": 2})
    poison_method_loss(monkeypatch, ClipMethod, {2, 5})
    assert cli_main(["pretrain", str(cfg), "train.max_nonfinite_steps=1", "train.stop_after_steps=4"]) == 0
    assert load_checkpoint(run)[0]["nonfinite_steps"] == [2]
    assert cli_main(["pretrain", str(cfg), "train.max_nonfinite_steps=1", "resume=latest"]) == 2
    err = capsys.readouterr().err
    assert "not finite at step 5" in err and "steps of this run: 2, 5, more than train.max_nonfinite_steps=1" in err
    assert "step_000004" in err
    state, _ = load_checkpoint(run)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())
    # the default, 0: the first one stops the run, as before
    assert cli_main(["pretrain", str(cfg), f"run_dir={tmp_path / 'zero'}"]) == 2
    assert "not finite at step 2" in capsys.readouterr().err


def test_a_skipped_dino_step_leaves_student_teacher_and_centre_as_they_were(tmp_path, synthetic_shards, monkeypatch):
    from pretrain.config import PretrainConfig
    from pretrain.dino.method import DinoMethod
    from pretrain.train import train
    from test_dino import tiny_config

    poison_method_loss(monkeypatch, DinoMethod, {POISONED})
    cfg = load_config(PretrainConfig, None, [
        f"data.train_shards={synthetic_shards}", f"run_dir={tmp_path / 'dino'}", "method=dino", "data.batch_size=8",
        "data.workers=0", f"train.max_steps={STEPS}", "train.threads=1", "optim.warmup_steps=2",
        "train.max_nonfinite_steps=1"])
    cfg.dino = tiny_config()
    states: dict[int, dict] = {}
    assert train(cfg, on_step=lambda step, model: states.__setitem__(step, snapshot(model))) == 0
    assert "center" in states[POISONED]
    assert not torch.equal(states[POISONED - 1]["center"], states[POISONED - 2]["center"])  # a step moves it
    assert_equal_states(states[POISONED], states[POISONED - 1])
    assert all(torch.isfinite(v).all() for v in states[STEPS].values())


def test_finetuning_skips_a_nonfinite_step_within_the_bound(tmp_path, monkeypatch, capsys):
    import finetune.train
    from baton.cli import main as cli_main
    from conftest import make_synthetic_shards
    from test_finetune import overrides, write_tiny_handoff

    make_synthetic_shards(tmp_path / "data" / "train", per_class=4, seed=0)
    make_synthetic_shards(tmp_path / "data" / "test", per_class=3, seed=1)
    handoff = write_tiny_handoff(tmp_path / "handoff")
    recipe = str(Path(__file__).resolve().parents[1] / "configs" / "demo_softtriple.yaml")

    def args(run: str, *extra: str) -> list[str]:
        return [recipe, *overrides(tmp_path, handoff, run, "train.epochs=1", "train.steps_per_epoch=5",
                                   "train.checkpoint_every=1", "train.keep_last=0", "train.eval_at_end=false",
                                   "train.log_every=1", *extra)]

    with monkeypatch.context() as m:   # finetuning's Adam steps once per step: count the calls
        done = drop_update(m, POISONED, torch.optim.Adam)
        real_step = torch.optim.Adam.step

        def counted(self, *a, **kw):
            out = real_step(self, *a, **kw)
            done[0] += 1
            return out
        m.setattr(torch.optim.Adam, "step", counted)
        assert cli_main(["finetune", *args("reference")]) == 0
    real_build = finetune.train.build_loss

    def poisoned_build(*a, **kw):
        criterion, calls = real_build(*a, **kw), [0]
        real_forward = criterion.forward

        def forward(*x, **k):
            calls[0] += 1
            out = real_forward(*x, **k)
            return out * float("nan") if calls[0] == POISONED else out
        criterion.forward = forward
        return criterion

    monkeypatch.setattr(finetune.train, "build_loss", poisoned_build)
    assert cli_main(["finetune", *args("skip", "train.max_nonfinite_steps=1")]) == 0
    ckpt = tmp_path / "skip" / "checkpoints"
    before, skipped = (load_checkpoint(ckpt / f"step_{s:06d}")[0] for s in (POISONED - 1, POISONED))
    assert skipped["nonfinite_steps"] == [POISONED]
    for part in ("model", "loss"):
        assert_equal_states(before[part], skipped[part])
    assert_equal_states(load_checkpoint(tmp_path / "skip")[0]["model"], load_checkpoint(tmp_path / "reference")[0]["model"])
    assert cli_main(["finetune", *args("stop")]) == 2    # the default bound, 0
    err = capsys.readouterr().err
    assert f"not finite at step {POISONED}" in err and f"step_{POISONED - 1:06d}" in err
