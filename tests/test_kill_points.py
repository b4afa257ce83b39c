"""kill -9 at seeded random steps of pretraining (CLIP, DINO) and finetuning, and in the middle of a
checkpoint write: each run resumed with `resume=latest` (as often as it was killed) ends bit-equal
to an uninterrupted run, and a checkpoint cut short never replaces the last good one.

The kill points are drawn from a fixed seed (2 per stage, to keep the time down); a kill lands
wherever the process is when its metrics row for that step appears (mid-step, in a checkpoint,
in the loader), which is the point: any instant must be safe. `baton shards --workers 2` is killed
the same way (only its main process, as the OOM killer would): its workers must not outlive it,
and the rerun must give the shards of an uninterrupted run, byte for byte (tests/
test_data_prep_http.py kills the whole process group of a run over URLs)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from baton.checkpoint import load_checkpoint
from conftest import descendant_pids
from test_pretrain import write_tiny_config

REPO = Path(__file__).resolve().parents[1]
SEED = 15             # the number: the kill points of every stage come from it
POINTS = 2            # kills per stage


def kill_points(total: int, stage: str) -> list[int]:
    """POINTS distinct steps in [2, total - 1], sorted, the same on every run of the suite."""
    return sorted(random.Random(f"{SEED}-{stage}").sample(range(2, total), POINTS))


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def logged_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip().endswith("}")]
    return max(steps, default=0)


def run_until_killed(argv: list[str], run: Path, step: int, timeout: float = 300) -> None:
    """Start `python -m baton ARGV` and SIGKILL its whole process group once `run` logged `step`."""
    proc = subprocess.Popen([sys.executable, "-m", "baton", *argv], env=_env(), cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while logged_step(run) < step:
            if proc.poll() is not None:
                pytest.fail(f"ended before step {step} (exit {proc.returncode}): {proc.stderr.read().decode()[-3000:]}")
            assert time.monotonic() < deadline, f"step {step} not reached in {timeout} s"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stderr.close()


def run_to_end(argv: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "baton", *argv], env=_env(), cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def assert_equal(a, b, where: str) -> None:
    """Tensors bit-equal, and so every tensor inside dicts and lists (optimiser state)."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_checkpoint(a: Path, b: Path, parts: tuple[str, ...]) -> None:
    sa, sb = load_checkpoint(a)[0], load_checkpoint(b)[0]
    assert sa["step"] == sb["step"]
    for part in parts:
        assert_equal(sa[part], sb[part], part)


def killed_and_resumed(argv: list[str], run: Path, total: int, stage: str) -> None:
    for point in kill_points(total, stage):
        run_until_killed([*argv, f"run_dir={run}", *(["resume=latest"] if run.exists() else [])], run, point)
    run_to_end([*argv, f"run_dir={run}", "resume=latest"])
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_pretraining_killed_at_random_steps_resumes_bit_equal(tmp_path, synthetic_shards):
    cfg = write_tiny_config(tmp_path / "c.yaml", tmp_path / "unused", synthetic_shards,
                            data={"workers": 1}, train={"epochs": 2, "checkpoint_every": 3})   # 16 steps
    argv = ["pretrain", str(cfg)]
    run_to_end([*argv, f"run_dir={tmp_path / 'full'}"])
    killed_and_resumed(argv, tmp_path / "killed", 16, "clip")
    assert_same_checkpoint(tmp_path / "full", tmp_path / "killed", ("model", "optimizer"))


@pytest.mark.slow
def test_dino_killed_at_random_steps_resumes_bit_equal(tmp_path, synthetic_shards):
    import yaml

    from test_dino import TINY_VIT

    dino = {"backbone": "vit_tiny_patch16_224", "backbone_kwargs": dict(TINY_VIT), "out_dim": 64, "hidden_dim": 48,
            "bottleneck_dim": 16, "global_crop_size": 32, "local_crop_size": 16, "n_local_crops": 2}
    cfg = tmp_path / "dino.yaml"
    cfg.write_text(yaml.safe_dump({"method": "dino", "dino": dino, "seed": 0,
                                   "data": {"train_shards": str(synthetic_shards), "batch_size": 8, "workers": 1},
                                   "optim": {"warmup_steps": 2},
                                   "train": {"epochs": 1, "checkpoint_every": 2, "log_every": 1, "device": "cpu",
                                             "threads": 1}}))
    argv = ["pretrain", str(cfg)]
    run_to_end([*argv, f"run_dir={tmp_path / 'full'}"])
    killed_and_resumed(argv, tmp_path / "killed", 8, "dino")
    assert_same_checkpoint(tmp_path / "full", tmp_path / "killed", ("model",))


@pytest.mark.slow
def test_finetuning_killed_at_random_steps_resumes_bit_equal(tmp_path):
    from conftest import make_synthetic_shards
    from test_finetune import overrides, write_tiny_handoff

    make_synthetic_shards(tmp_path / "data" / "train", per_class=4, seed=0)
    make_synthetic_shards(tmp_path / "data" / "test", per_class=3, seed=1)
    handoff = write_tiny_handoff(tmp_path / "handoff")
    recipe = str(REPO / "configs" / "demo_softtriple.yaml")
    argv = ["finetune", recipe, *overrides(tmp_path, handoff, "unused", "train.epochs=2", "train.checkpoint_every=3",
                                           "train.log_every=1", "train.eval_at_end=false")]
    run_to_end([*argv, f"run_dir={tmp_path / 'full'}"])
    killed_and_resumed(argv, tmp_path / "killed", 16, "finetune")
    assert_same_checkpoint(tmp_path / "full", tmp_path / "killed", ("model", "loss"))


# A pretraining run whose `nth` state.pt write hangs once the file is half written (as a kill in
# the middle of torch.save finds it): the parent kills it there.
HANGING_SAVE = """
import sys, time
from pathlib import Path
import baton.checkpoint as ck
real, calls, nth, flag = ck.torch.save, [0], int(sys.argv[1]), Path(sys.argv[2])
def save(obj, f, *a, **kw):
    calls[0] += 1
    if calls[0] == nth:
        real(obj, f, *a, **kw)
        data = Path(f).read_bytes()
        Path(f).write_bytes(data[: len(data) // 2])
        flag.write_text("writing")
        time.sleep(600)
    return real(obj, f, *a, **kw)
ck.torch.save = save
from baton.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_write_keeps_the_last_good_one(tmp_path, synthetic_shards):
    cfg = write_tiny_config(tmp_path / "c.yaml", tmp_path / "unused", synthetic_shards,
                            train={"checkpoint_every": 2})   # 8 steps: checkpoints 2, 4, 6, 8
    run_to_end(["pretrain", str(cfg), f"run_dir={tmp_path / 'full'}"])
    run, flag = tmp_path / "killed", tmp_path / "writing"
    proc = subprocess.Popen([sys.executable, "-c", HANGING_SAVE, "2", str(flag), "pretrain", str(cfg),
                             f"run_dir={run}"], env=_env(), cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not flag.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    ckpts = run / "checkpoints"
    assert (ckpts / ".step_000004.tmp").is_dir()                  # the write cut short
    state, meta = load_checkpoint(run)
    assert state["step"] == 2 and meta["path"].endswith("step_000002")   # the last good one
    run_to_end(["pretrain", str(cfg), f"run_dir={run}", "resume=latest"])
    assert not (ckpts / ".step_000004.tmp").exists()
    assert_same_checkpoint(tmp_path / "full", run, ("model", "optimizer"))


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie has exited; only its parent has not reaped it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _kill_shards_after(argv: list[str], out: Path, more: int) -> int:
    """Start `baton shards ARGV`; once it has recorded `more` chunks beyond those already done,
    SIGKILL its main process only. Its forkserver and workers, seen while it ran, must all be gone
    within 15 s. Returns how many there were."""
    def recorded() -> int:
        return len(list((out / "_progress").glob("chunk-*.json")))

    proc = subprocess.Popen([sys.executable, "-m", "baton", *argv], env=_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target, seen, deadline = recorded() + more, set(), time.monotonic() + 120
    try:
        while recorded() < target:
            if len(seen) < 3:   # the forkserver and 2 workers
                seen |= descendant_pids(proc.pid)
            assert proc.poll() is None, f"ended before chunk {target}: {proc.stderr.read().decode()[-3000:]}"
            assert time.monotonic() < deadline, f"chunk {target} not recorded in 120 s"
            time.sleep(0.01)
        seen |= descendant_pids(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_running(p) for p in seen):
        time.sleep(0.1)
    alive = [p for p in seen if _running(p)]
    for p in alive:
        os.kill(p, signal.SIGKILL)
    assert len(seen) >= 3 and not alive, f"{len(alive)} of the {len(seen)} processes of baton shards outlived it"
    return recorded()


@pytest.mark.slow
def test_baton_shards_killed_at_random_points_gives_the_same_shards(tmp_path):
    import numpy as np
    from PIL import Image

    from test_data_prep_http import _digests

    rng = np.random.default_rng(SEED)
    root = tmp_path / "tree"
    for c in range(3):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(60):
            Image.fromarray(rng.integers(0, 256, (160, 160, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i:02d}.png")
    # 180 images, 1 a shard: a kill lets the chunks already sent to workers finish, and on a fast
    # machine ~20 more are recorded while this test polls, so three kills of at most 7 chunks more
    # each leave work for the last run only if there are well over 3 x 27 chunks (60 were too few)
    chunks = 180
    base = ["shards", "folder", str(root), "--shard-size", "1", "--max-side", "48"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    run_to_end([*base, "--out", str(ref)])
    done = [_kill_shards_after([*base, "--out", str(killed), "--workers", "2"], killed, more)
            for more in random.Random(f"{SEED}-shards").sample(range(1, 8), 3)]   # chunks more per run
    assert done[-1] < chunks and not (killed / "stats.json").exists(), done
    run_to_end([*base, "--out", str(killed), "--workers", "2"])
    assert _digests(killed) == _digests(ref)     # same shards, same bytes, same stats
    assert len(_digests(ref)[0]) == chunks
    assert not [p for p in killed.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]
