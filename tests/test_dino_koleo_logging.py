"""DINO with KoLeo reads no loss part on the host inside a step: `DinoMethod.loss` hands
dino_loss / koleo_loss to the engine as detached 0-dim tensors, and the engine converts them only
on a logged step (train.log_every). The logged values are those of the step they are logged at:
the float of each step's parts, taken by the test right after that step's loss, equals
metrics.jsonl's row of that step, and loss = dino_loss + weight x koleo_loss there."""

from __future__ import annotations

import json

import pytest
import torch

from pretrain.dino.method import DinoMethod
from test_dino import random_crops, tiny_config, tiny_method


def _refuse_host_reads(monkeypatch):
    """Make every tensor-to-Python read fail: what runs meanwhile syncs with no device."""
    def refuse(*_a, **_k):
        raise AssertionError("a tensor was read on the host inside DINO's loss")
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


def test_koleo_parts_are_returned_as_tensors_without_a_host_read(monkeypatch):
    m = tiny_method(koleo_loss_weight=0.5)
    model = m.build_model()
    crops = random_crops(m.dino, 4)
    with monkeypatch.context() as patch:
        _refuse_host_reads(patch)
        loss, extra = m.loss(model, crops, 0, 100)
    for key in ("dino_loss", "koleo_loss"):
        assert torch.is_tensor(extra[key]) and extra[key].ndim == 0 and not extra[key].requires_grad
    torch.testing.assert_close(loss.detach(), extra["dino_loss"] + 0.5 * extra["koleo_loss"])


@pytest.mark.slow
def test_logged_parts_are_each_logged_steps_own(synthetic_shards, tmp_path, monkeypatch):
    from baton.config import load_config
    from pretrain.config import PretrainConfig
    from pretrain.train import train

    seen: dict[int, dict[str, float]] = {}
    real = DinoMethod.loss

    def recording(self, net, batch, step, total):
        loss, extra = real(self, net, batch, step, total)
        seen[step + 1] = {"loss": float(loss.detach()), **{k: float(v) for k, v in extra.items()}}
        return loss, extra

    monkeypatch.setattr(DinoMethod, "loss", recording)
    cfg = load_config(PretrainConfig, None, [
        f"data.train_shards={synthetic_shards}", f"run_dir={tmp_path / 'run'}", "method=dino", "data.batch_size=8",
        "data.workers=0", "train.epochs=1", "train.log_every=3", "train.threads=1", "optim.warmup_steps=2",
        "train.checkpoint_every=100"])
    cfg.dino = tiny_config(koleo_loss_weight=0.25)
    assert train(cfg) == 0
    rows = {r["step"]: r for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
            if "dino_loss" in (r := json.loads(line))}
    assert sorted(rows) == [3, 6, 8] and sorted(seen) == list(range(1, 9))   # every 3rd step and the last
    assert len({round(seen[s]["koleo_loss"], 6) for s in rows}) == 3          # the parts move between steps
    for step, row in rows.items():
        for key in ("dino_loss", "koleo_loss", "loss"):
            assert row[key] == pytest.approx(seen[step][key], rel=1e-6, abs=1e-7), (step, key)
        assert row["loss"] == pytest.approx(row["dino_loss"] + 0.25 * row["koleo_loss"], rel=1e-5)
