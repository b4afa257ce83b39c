"""Faults of one rank in a 2-rank pretraining run (gloo on CPU, one plain process per rank, as
srun starts them: no torchrun agent that would end the survivors itself).

- one rank's loss is not finite: every rank takes the same decision at the same step, because the
  decision is an all_reduce of each rank's finite flag. With `train.max_nonfinite_steps=1` both
  skip it and the run equals a 2-rank run whose update of that step was left out; with 0 both stop
  at that step, naming it and the rank whose loss was not finite. A rank that decided alone would
  apply (or wait for) a step the other one does not.
- one rank is killed with SIGKILL: the survivor exits within the collective limit
  (`BATON_COLLECTIVE_TIMEOUT_S`) with an error naming its rank and the lost peer, never a hang or a
  raw traceback; `resume=latest` then ends bit-equal to an uninterrupted run. One that is stopped
  (SIGSTOP) makes the other fail the same way once the limit has passed.

Pytest runs the tests; each rank runs this file as a script (`_worker`) or `python -m baton`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from baton.checkpoint import load_checkpoint
from test_pretrain import write_tiny_config

REPO = Path(__file__).resolve().parents[1]
POISONED = 3          # the 1-based step whose loss is NaN on rank 1 only
STEPS = 8             # 2 epochs of 64 samples at 8 per rank x 2 ranks
TIMEOUT_S = 20        # BATON_COLLECTIVE_TIMEOUT_S of these runs
STRATEGIES = ("ddp", "fsdp")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(argv: list[str], out: Path, tag: str, timeout_s: int = TIMEOUT_S) -> list[subprocess.Popen]:
    """Two processes `python ARGV` forming one 2-rank world; stderr to OUT/TAG-rankR.txt."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "BATON_COLLECTIVE_TIMEOUT_S": str(timeout_s),
           "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    procs = []
    for r in (0, 1):
        with open(out / f"{tag}-rank{r}.txt", "w") as err:
            procs.append(subprocess.Popen([sys.executable, *argv], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                          cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
    finally:
        kill_all(procs)
    return [p.returncode for p in procs]


def kill_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def stderr_of(out: Path, tag: str, rank: int) -> str:
    return (out / f"{tag}-rank{rank}.txt").read_text()


def full_state(run: Path) -> dict:
    from pretrain.strategies import full_model_state

    state, meta = load_checkpoint(run)
    return {"step": state["step"], "model": full_model_state(meta["path"], state),
            "nonfinite_steps": state.get("nonfinite_steps")}


# ------------------------------------------------------------------ one rank's loss not finite

@pytest.fixture(scope="module")
def nonfinite_launch(tmp_path_factory, synthetic_shards) -> tuple[Path, list[dict]]:
    """One 2-rank launch running the runs of `_nonfinite_worker` for each strategy."""
    out = tmp_path_factory.mktemp("nonfinite")
    codes = wait_all(start_ranks([__file__, "nonfinite", str(out), str(synthetic_shards)], out, "nonfinite"), 420)
    assert codes == [0, 0], [stderr_of(out, "nonfinite", r)[-4000:] for r in (0, 1)]
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_one_ranks_nonfinite_loss_is_decided_by_every_rank_together(strategy, nonfinite_launch):
    out, seen = nonfinite_launch
    # train.max_nonfinite_steps=1: both ranks skipped step 3 and went on, as without its update
    skip_run, stop_run = seen[0][f"{strategy}-skip"], seen[0][f"{strategy}-stop"]
    for r in (0, 1):
        skip = seen[r][f"{strategy}-skip"]
        assert skip["error"] is None and skip["steps"] == list(range(1, STEPS + 1)), (r, skip["error"])
        assert skip["sums"][POISONED - 1] == skip["sums"][POISONED - 2], r     # step 3 changed nothing
    if strategy == "ddp":   # replicas agree (FSDP's ranks each hold a shard)
        assert seen[0]["ddp-skip"]["sums"] == seen[1]["ddp-skip"]["sums"]
    skip, ref = full_state(out / f"{strategy}-skip"), full_state(out / f"{strategy}-reference")
    assert skip["step"] == ref["step"] == STEPS and skip["nonfinite_steps"] == [POISONED]
    assert all(torch.equal(skip["model"][k], ref["model"][k]) for k in ref["model"])

    # the default 0: both ranks stop at step 3, before it is applied, naming it and rank 1
    for r in (0, 1):
        stop = seen[r][f"{strategy}-stop"]
        assert stop["steps"] == [1, 2] and stop["error"] is not None, r
        assert f"not finite at step {POISONED}" in stop["error"] and "on rank 1 of 2" in stop["error"], stop
        assert "step_000002" in stop["error"], stop          # the last good checkpoint
    assert ("here, rank 1" in seen[1][f"{strategy}-stop"]["error"]) and ("here" not in stop_run["error"])
    assert load_checkpoint(out / f"{strategy}-stop")[0]["step"] == 2 and skip_run["error"] is None


def _nonfinite_worker(out: Path, shards: str) -> None:
    """Three runs per strategy in one process group: the reference (the optimiser's update of step 3
    left out), rank 1's loss NaN at step 3 with max_nonfinite_steps=1 (skip) and with 0 (stop)."""
    import pretrain.train
    from baton.config import load_config
    from baton.errors import BatonError
    from pretrain.clip.method import ClipMethod
    from pretrain.config import PretrainConfig
    from test_nonfinite import drop_update, poison_method_loss

    rank = int(os.environ["RANK"])
    destroy = pretrain.train.destroy
    pretrain.train.destroy = lambda: None   # several runs in one process group
    cfg_path = write_tiny_config(out / f"c{rank}.yaml", out / "unused", shards,
                                 train={"epochs": 2, "checkpoint_every": 2, "log_every": 1})
    seen: dict[str, dict] = {}

    def run(name: str, *overrides: str, done: list[int] | None = None) -> None:
        steps, sums = [], []

        def on_step(step, model):
            steps.append(step)
            if done is not None:   # drop_update's count of finished steps
                done[0] = step
            sums.append(sum(p.double().sum().item() for p in model.parameters()))

        cfg = load_config(PretrainConfig, cfg_path, [f"run_dir={out / name}", *overrides])
        error = None
        try:
            assert pretrain.train.train(cfg, on_step=on_step) == 0
        except BatonError as e:
            error = str(e)
        seen[name] = {"steps": steps, "sums": sums, "error": error}

    for strategy in STRATEGIES:
        with pytest.MonkeyPatch.context() as m:
            run(f"{strategy}-reference", f"train.strategy={strategy}", done=drop_update(m, POISONED))
        with pytest.MonkeyPatch.context() as m:
            poison_method_loss(m, ClipMethod, {POISONED}, ranks={1})
            run(f"{strategy}-skip", f"train.strategy={strategy}", "train.max_nonfinite_steps=1")
            run(f"{strategy}-stop", f"train.strategy={strategy}")
    (out / f"rank{rank}.json").write_text(json.dumps(seen))
    destroy()



# A rank of `baton pretrain` that sends itself SIGNAL in the middle of step AT (after its forward,
# before the backward's all-reduce): SIGKILL is what the OOM killer or a lost node does to a rank,
# SIGSTOP a rank that hangs (a stuck file system, a debugger).
SELF_KILL = """
import os, signal, sys
from pretrain.clip.method import ClipMethod
real, victim, at, sig = ClipMethod.loss, int(sys.argv[1]), int(sys.argv[2]), getattr(signal, sys.argv[3])
def loss(self, net, batch, step, total):
    out = real(self, net, batch, step, total)
    if self.info.rank == victim and step + 1 == at:
        os.kill(os.getpid(), sig)
    return out
ClipMethod.loss = loss
from baton.cli import main
sys.exit(main(sys.argv[4:]))
"""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, synthetic_shards) -> tuple[Path, Path]:
    """A 2-rank `baton pretrain` of 8 steps (checkpoints every 2) and its config."""
    out = tmp_path_factory.mktemp("uninterrupted")
    cfg = write_tiny_config(out / "c.yaml", out / "unused", synthetic_shards,
                            train={"epochs": 2, "checkpoint_every": 2})
    codes = wait_all(start_ranks(["-m", "baton", "pretrain", str(cfg), f"run_dir={out / 'run'}"], out, "full"), 300)
    assert codes == [0, 0], [stderr_of(out, "full", r)[-4000:] for r in (0, 1)]
    return cfg, out / "run"


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])   # rank 0 also holds the rendezvous store
def test_a_killed_rank_ends_the_other_with_a_clear_error_and_resume_is_bit_equal(victim, uninterrupted, tmp_path):
    from test_kill_points import assert_same_checkpoint

    cfg, full = uninterrupted
    run, survivor, kill_at = tmp_path / "run", 1 - victim, 5
    procs = start_ranks(["-c", SELF_KILL, str(victim), str(kill_at), "SIGKILL", "pretrain", str(cfg),
                         f"run_dir={run}"], tmp_path, "killed")
    procs[victim].wait(timeout=300)
    died = time.monotonic()
    codes = wait_all(procs, timeout=TIMEOUT_S + 30)
    lasted = time.monotonic() - died
    err = stderr_of(tmp_path, "killed", survivor)
    assert codes[victim] == -signal.SIGKILL and codes[survivor] == 2, (codes, err[-4000:])
    assert lasted < TIMEOUT_S + 10, lasted                         # bounded by the collective limit
    assert "Traceback" not in err, err[-4000:]
    assert f"error: rank {survivor} of 2: step {kill_at} of {STEPS} failed" in err, err[-2000:]
    assert f"rank {victim} (the peer at 127.0.0.1:" in err and "resume=latest" in err, err[-2000:]
    assert load_checkpoint(run)[0]["step"] == kill_at - 1          # the last one before the kill

    codes = wait_all(start_ranks(["-m", "baton", "pretrain", str(cfg), f"run_dir={run}", "resume=latest"],
                                 tmp_path, "resumed"), 300)
    assert codes == [0, 0], [stderr_of(tmp_path, "resumed", r)[-4000:] for r in (0, 1)]
    assert_same_checkpoint(full, run, ("model", "optimizer"))



@pytest.mark.slow
def test_a_stopped_rank_ends_the_other_after_the_collective_limit(uninterrupted, tmp_path):
    cfg, _ = uninterrupted
    limit = 8
    procs = start_ranks(["-c", SELF_KILL, "1", "5", "SIGSTOP", "pretrain", str(cfg), f"run_dir={tmp_path / 'run'}"],
                        tmp_path, "stopped", timeout_s=limit)
    try:
        procs[0].wait(timeout=300)
        err = stderr_of(tmp_path, "stopped", 0)
        assert procs[0].returncode == 2 and "Traceback" not in err, err[-4000:]
        assert "error: rank 0 of 2: step 5 of 8 failed" in err and "rank 1" in err, err[-2000:]
        assert f"BATON_COLLECTIVE_TIMEOUT_S={limit} s" in err, err[-2000:]
        assert procs[1].poll() is None                                # still stopped, never a word
    finally:
        kill_all(procs)                                               # the stopped one



def test_only_a_peers_fault_is_reported_as_one(tmp_path):
    """`peer_failures` names the lost peer for transport errors and timeouts, and lets every other
    error (a bug, a BatonError) through unchanged: a shape mismatch must not read as a dead rank."""
    import torch.distributed as dist

    from baton.distributed import peer_failures
    from baton.errors import BatonError

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        gloo = RuntimeError("[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by "
                            "peer [10.1.2.3]:29411. This is typically caused by a remote worker crashing.")
        with pytest.raises(BatonError, match=r"^rank 0 of 1: step 7 failed \(Connection closed by peer "
                                             r"\[10.1.2.3\]:29411\..*another rank \(the peer at 10.1.2.3:29411\) died"):
            with peer_failures(lambda: "step 7"):
                raise gloo
        with pytest.raises(BatonError, match="rank 0 of 1: a barrier failed.*stuck"):
            with peer_failures("a barrier"):
                raise dist.DistBackendError("Timed out waiting 8000ms for recv operation to complete")
        for error in (RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x32 and 16x32)"),
                      BatonError("data.batch_size must be at least 1"), ValueError("bad value")):
            with pytest.raises(type(error)) as caught:
                with peer_failures("step 1"):
                    raise error
            assert caught.value is error
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    mode, out, shards = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    {"nonfinite": _nonfinite_worker}[mode](out, shards)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_a_killed_rank_under_sharded_strategies_resumes_bit_equal(strategy, uninterrupted, tmp_path):
    """As above, for the strategies whose checkpoints are sharded (FSDP2's DCP, DeepSpeed ZeRO-2's
    per-rank optimiser files): rank 1 is SIGKILLed in step 5, the survivor ends with the error, and
    the run resumed from step 4 ends with the weights of the same run uninterrupted."""
    from pretrain.strategies import full_model_state

    cfg, _ = uninterrupted
    chosen = [f"train.strategy={strategy}"]
    full = tmp_path / "full"
    codes = wait_all(start_ranks(["-m", "baton", "pretrain", str(cfg), f"run_dir={full}", *chosen],
                                 tmp_path, "full"), 300)
    assert codes == [0, 0], [stderr_of(tmp_path, "full", r)[-4000:] for r in (0, 1)]
    run = tmp_path / "run"
    procs = start_ranks(["-c", SELF_KILL, "1", "5", "SIGKILL", "pretrain", str(cfg), f"run_dir={run}", *chosen],
                        tmp_path, "killed")
    codes = wait_all(procs, timeout=300)
    err = stderr_of(tmp_path, "killed", 0)
    assert codes[1] == -signal.SIGKILL and codes[0] == 2, (codes, err[-4000:])
    assert "error: rank 0 of 2: step 5 of 8 failed" in err and "resume=latest" in err, err[-2000:]
    assert load_checkpoint(run)[0]["step"] == 4

    codes = wait_all(start_ranks(["-m", "baton", "pretrain", str(cfg), f"run_dir={run}", "resume=latest", *chosen],
                                 tmp_path, "resumed"), 300)
    assert codes == [0, 0], [stderr_of(tmp_path, "resumed", r)[-4000:] for r in (0, 1)]
    (a, meta_a), (b, meta_b) = load_checkpoint(full), load_checkpoint(run)
    assert a["step"] == b["step"] == STEPS and a["strategy"] == b["strategy"] == strategy
    want, got = full_model_state(meta_a["path"], a), full_model_state(meta_b["path"], b)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
