"""CLIP pretraining: exact resume, deterministic loading, http streaming, clear errors, learning."""

from __future__ import annotations

import itertools
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from baton.checkpoint import load_checkpoint
from baton.cli import main as cli_main
from baton.logs import read_metrics

# A CLIP small enough to train a few dozen steps in seconds on one CPU core.
TINY_MODEL = {
    "name": "test-tiny",
    "config": {"embed_dim": 32,
               "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
               "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}},
}


def write_tiny_config(path: Path, run_dir: Path, shards: str | Path, **sections) -> Path:
    """A YAML config for TINY_MODEL on `shards`; `sections` update clip/data/optim/train keys."""
    cfg = {"run_dir": str(run_dir), "seed": 0, "clip": dict(TINY_MODEL),
           "data": {"train_shards": str(shards), "batch_size": 8, "workers": 0, "shuffle_buffer": 32},
           "optim": {"lr": 1e-3, "warmup_steps": 2},
           "train": {"epochs": 1, "checkpoint_every": 100, "log_every": 1, "device": "cpu"}}
    for name, values in sections.items():
        cfg[name].update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_resume_after_interruption_gives_the_same_weights(tmp_path, synthetic_shards):
    """Interrupt mid-epoch, resume=latest from an earlier checkpoint: same final state, bit for bit."""
    cfg = write_tiny_config(tmp_path / "c.yaml", tmp_path / "unused", synthetic_shards,
                            data={"workers": 2}, clip={"caption": "random"},
                            train={"epochs": 2, "checkpoint_every": 5})  # 8 steps/epoch, 16 in all
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert cli_main(["pretrain", str(cfg), f"run_dir={full}"]) == 0
    assert cli_main(["pretrain", str(cfg), f"run_dir={cut}", "train.stop_after_steps=7"]) == 0
    stopped, meta = load_checkpoint(cut)
    assert stopped["step"] == 5 and meta["epoch"] == 0  # steps 6-7 were lost, as if killed
    assert cli_main(["pretrain", str(cfg), f"run_dir={cut}", "resume=latest"]) == 0

    a, _ = load_checkpoint(full)
    b, _ = load_checkpoint(cut)
    assert a["step"] == b["step"] == 16
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 16

    # A stop request (what the Slurm launcher sends on preemption) checkpoints at the step boundary
    # it arrives in, on top of the periodic checkpoints, and the resumed run again ends identical.
    from baton.config import load_config
    from baton.preemption import EXIT_STOPPED, clear_stop, request_stop
    from pretrain.config import PretrainConfig
    from pretrain.train import train

    asked = tmp_path / "asked"
    try:
        code = train(load_config(PretrainConfig, str(cfg), [f"run_dir={asked}"]),
                     on_batch=lambda step, keys: request_stop() if step == 3 else None)
    finally:
        clear_stop()
    assert code == EXIT_STOPPED
    assert load_checkpoint(asked)[0]["step"] == 3
    assert cli_main(["pretrain", str(cfg), f"run_dir={asked}", "resume=latest"]) == 0
    c, _ = load_checkpoint(asked)
    assert all(torch.equal(a["model"][k], c["model"][k]) for k in a["model"])

    rows = read_metrics(full / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 17))
    assert {"loss", "lr", "logit_scale", "samples_per_s"} <= set(rows[0])
    assert rows[0]["lr"] == pytest.approx(5e-4)  # warm-up: (0 + 1) / 2 of 1e-3
    for name in ("config.yaml", "log.txt", "tb"):
        assert (full / name).exists(), name
    assert "test-tiny" in (full / "config.yaml").read_text()


@pytest.mark.slow
def test_uint8_image_handoff_trains_the_same_weights(tmp_path, synthetic_shards):
    """Images handed over by the workers as uint8 and normalised on arrival (data.image_handoff
    auto on a GPU) train exactly the weights of images normalised in the workers (auto on a CPU)."""
    cfg = write_tiny_config(tmp_path / "c.yaml", tmp_path / "unused", synthetic_shards, data={"workers": 1})
    states = []
    for handoff in ("float", "uint8"):
        assert cli_main(["pretrain", str(cfg), f"run_dir={tmp_path / handoff}", f"data.image_handoff={handoff}",
                         "train.max_steps=4"]) == 0
        states.append(load_checkpoint(tmp_path / handoff)[0]["model"])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert cli_main(["pretrain", str(cfg), f"run_dir={tmp_path / 'bad'}", "data.image_handoff=bytes"]) != 0


@pytest.mark.slow
def test_loader_is_deterministic_and_epochs_differ(synthetic_shards):
    from baton.config import load_config
    from pretrain.clip.model import build_clip, build_tokenizer, build_transforms, preprocess_cfg
    from pretrain.config import PretrainConfig
    from pretrain.data import SampleToPair, make_loader, resolve_shards

    cfg = load_config(PretrainConfig, overrides=[f"data.train_shards={synthetic_shards}", "data.batch_size=8",
                                                 "data.workers=2", "clip.caption=random"])
    cfg.clip.config = TINY_MODEL["config"]
    pp = preprocess_cfg(build_clip(cfg.clip))
    to_pair = SampleToPair(build_transforms(pp, cfg.clip.augment)[0], build_tokenizer(cfg.clip), "random")
    shards = resolve_shards(cfg.data.train_shards)
    assert len(shards.urls) == 4 and shards.num_samples == 64

    def batches(epoch):
        return list(itertools.islice(make_loader(shards, cfg.data, to_pair, seed=0, epoch=epoch, rank=0, steps=6), 6))

    first, again, other = batches(0), batches(0), batches(1)
    assert len(first) == 6 and first[0][0].shape == (8, 3, 32, 32) and first[0][1].shape == (8, 16)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(first, again))
    assert not torch.equal(first[0][0], other[0][0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def http_shards(synthetic_shards):
    """The synthetic shards served by `python -m http.server` on a free local port."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                              cwd=synthetic_shards, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.slow
def test_streams_shards_over_http(tmp_path, http_shards, capsys):
    run = tmp_path / "run"
    cfg = write_tiny_config(tmp_path / "c.yaml", run, f"{http_shards}/", data={"workers": 2},
                            train={"max_steps": 2})
    assert cli_main(["pretrain", str(cfg)]) == 0
    state, _ = load_checkpoint(run)
    assert state["step"] == 2
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]

    capsys.readouterr()
    missing = f"{http_shards}/shard-{{000000..000004}}.tar"  # shard 4 does not exist
    assert cli_main(["pretrain", str(cfg), f"data.train_shards={missing}"]) == 2
    assert f"{http_shards}/shard-000004.tar" in capsys.readouterr().err


def test_clear_errors(tmp_path, synthetic_shards, capsys):
    cfg = write_tiny_config(tmp_path / "c.yaml", tmp_path / "run", tmp_path / "no_shards_here")
    assert cli_main(["pretrain", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "no_shards_here") in err and "baton shards" in err
    assert not (tmp_path / "run").exists()  # nothing written before the data is found

    assert cli_main(["pretrain", str(cfg), f"data.train_shards={synthetic_shards}", "clip.caption=best"]) == 2
    assert "clip.caption" in capsys.readouterr().err

    assert cli_main(["export", str(tmp_path / "no_run"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint found" in err and str(tmp_path / "no_run") in err
    assert not (tmp_path / "out").exists()
    assert cli_main(["export", str(tmp_path / "no_run")]) == 2
    assert "CHECKPOINT OUT" in capsys.readouterr().err


def test_loss_falls(tmp_path, synthetic_shards):
    run = tmp_path / "run"
    cfg = write_tiny_config(tmp_path / "c.yaml", run, synthetic_shards,
                            optim={"lr": 2e-3, "warmup_steps": 5}, train={"epochs": 5})  # 40 steps
    assert cli_main(["pretrain", str(cfg)]) == 0
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl")]
    assert len(losses) == 40
    first, last = sum(losses[:3]) / 3, sum(losses[-10:]) / 10
    assert first > 1.8  # about ln(8) = 2.08 at random init, batch 8
    # 16 distinct captions, so batches of 8 hold duplicate pairs: the loss floors near 0.8-1.0
    assert last < 0.6 * first, (first, last)
