"""Slurm: `baton submit` against a real single-node cluster (munge, MariaDB, slurmdbd, slurmctld,
slurmd started by slurm/local_cluster/start.sh, once per session, stopped at the end).

- a 2-task CLIP pretraining job trains, checkpoints, and its run exports;
- the same job preempted mid-run (`scancel --signal=USR2`) checkpoints, requeues itself, resumes
  and ends with the same weights as the uninterrupted job, tensor by tensor;
- shard preparation as a job array over parts writes the same bytes as a local run;
- a failing job reports the stage's error with the log path; a cancelled job is reported cancelled.

Skipped (with the reason) where the cluster cannot be installed: not root, not Debian, no apt-get.
The cluster-free parts (the sbatch script, the environment mapping, the options) run always, in
tests/test_slurm_submit.py.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from baton.checkpoint import load_checkpoint
from baton.cli import main as cli_main
from baton.logs import read_metrics
from test_pretrain import write_tiny_config

REPO = Path(__file__).resolve().parents[1]
START, STOP = REPO / "slurm" / "local_cluster" / "start.sh", REPO / "slurm" / "local_cluster" / "stop.sh"
TWO_TASKS = ["cluster.tasks_per_node=2", "cluster.time=15"]


def _cannot_run_cluster() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "the local Slurm cluster needs root (it installs packages and runs the daemons)"
    if not Path("/etc/debian_version").is_file():
        return "the local Slurm cluster needs Debian packages (no /etc/debian_version)"
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        return "the local Slurm cluster needs apt-get to install munge/slurm/mariadb"
    return None


LEASES = Path(os.environ.get("BATON_SLURM_STATE", "/var/lib/baton-slurm")) / "test-sessions"


def _other_live_sessions() -> list[int]:
    pids = [int(p.name) for p in LEASES.glob("*") if p.name.isdigit() and int(p.name) != os.getpid()]
    return [pid for pid in pids if Path(f"/proc/{pid}").exists()]


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running one-node Slurm cluster for the session. Each test session holds a lease (its PID)
    while it uses the cluster; the last one to finish stops it (test runs share this machine)."""
    reason = _cannot_run_cluster()
    if reason:
        pytest.skip(reason)
    LEASES.mkdir(parents=True, exist_ok=True)
    lease = LEASES / str(os.getpid())
    lease.touch()
    try:
        proc = subprocess.run([str(START)], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"start.sh failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        yield
    finally:
        lease.unlink(missing_ok=True)
        if not _other_live_sessions():
            subprocess.run([str(STOP)], capture_output=True, timeout=120)


def _sacct_state(job_id: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], capture_output=True, text=True)
    return (out.stdout.strip().splitlines() or ["UNKNOWN"])[-1]


def _wait_until(cond, timeout: float, what: str, poll: float = 0.25) -> None:
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < timeout, f"timed out after {timeout}s waiting for {what}"
        time.sleep(poll)


def _record(run_dir: Path) -> dict:
    return json.loads((run_dir / "slurm" / "job.json").read_text())


# ---------------------------------------------------------------- against the cluster

@pytest.fixture(scope="module")
def clip_jobs(slurm_cluster, tmp_path_factory, synthetic_shards):
    """The same 2-task pretraining submitted twice, side by side: `full` runs through, `preempted`
    gets USR2 (`scancel --signal=USR2`, what Slurm sends on preemption) after its first step."""
    d = tmp_path_factory.mktemp("slurm_clip")
    cfg = write_tiny_config(d / "clip.yaml", d / "unused", synthetic_shards,
                            train={"epochs": 4, "checkpoint_every": 6})  # 4 steps/epoch x 2 ranks: 16 steps
    runs = {name: d / name for name in ("full", "preempted")}
    for name, run in runs.items():
        assert cli_main(["submit", "pretrain", str(cfg), f"run_dir={run}", *TWO_TASKS]) == 0
    job_id = _record(runs["preempted"])["job_ids"][0]
    metrics = runs["preempted"] / "metrics.jsonl"
    _wait_until(lambda: metrics.is_file() and metrics.stat().st_size > 0, 240, "the first step of the preempted job")
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    return runs


@pytest.mark.slow
def test_two_task_pretraining_job_trains_checkpoints_and_exports(clip_jobs, capsys):
    run = clip_jobs["full"]
    assert cli_main(["status", str(run), "--wait"]) == 0
    assert "completed" in capsys.readouterr().out
    state, _ = load_checkpoint(run)
    assert state["step"] == 16
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, 17))
    log = (run / "log.txt").read_text()
    assert "first attempt, restarts: 0, 2 tasks" in log
    record = _record(run)
    assert record["tasks"] == 2 and record["executor"] == "slurm"
    folder = Path(record["log_folder"].replace("%j", record["job_ids"][0]))
    assert all((folder / f"{record['job_ids'][0]}_{t}_result.pkl").is_file() for t in (0, 1))  # both tasks ran
    assert cli_main(["logs", str(run), "--stderr", "-n", "200"]) == 0
    assert "restarts: 0" in capsys.readouterr().out

    assert cli_main(["export", str(run), str(run / "export")]) == 0
    handoff = json.loads((run / "export" / "backbone.json").read_text())
    assert handoff["source"]["step"] == 16 and (run / "export" / "backbone.safetensors").is_file()


@pytest.mark.slow
def test_preempted_job_requeues_resumes_and_ends_with_the_same_weights(clip_jobs, capsys):
    from slurm.control import jobs_of, wait

    full, run = clip_jobs["full"], clip_jobs["preempted"]
    (out,) = wait(jobs_of(_record(run)), timeout_s=400)
    assert out.state == "COMPLETED", out.message
    log = (run / "log.txt").read_text()
    assert "requeueing job" in log and "resumed with resume=latest, restarts: 1" in log, log
    stopped = [line for line in log.splitlines() if "stopped on request after step" in line]
    assert len(stopped) == 1 and int(stopped[0].split("after step ")[1].split()[0]) < 16, log

    capsys.readouterr()
    assert cli_main(["status", str(run)]) == 0
    assert "restarts (preemption / time limit): 1" in capsys.readouterr().out
    assert cli_main(["status", str(full), "--wait"]) == 0
    a, _ = load_checkpoint(full)
    b, _ = load_checkpoint(run)
    assert a["step"] == b["step"] == 16
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)


def _image_tree(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for c in ("ant", "bee", "cat"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(buf, format="PNG")
            (root / c / f"{i}.png").write_bytes(buf.getvalue())
    return root


def _shard_set(d: Path) -> tuple[dict[str, bytes], dict]:
    stats = json.loads((d / "stats.json").read_text())
    stats.pop("throughput", None)
    return {p.name: p.read_bytes() for p in sorted(d.glob("shard-*.tar"))}, stats


@pytest.fixture(scope="module")
def shard_reference(tmp_path_factory) -> tuple[Path, list[str], tuple]:
    """(work dir, the `baton shards` arguments, the shards and stats a local run writes with them)."""
    d = tmp_path_factory.mktemp("slurm_shards")
    args = ["folder", str(_image_tree(d / "tree")), "--shard-size", "4"]
    assert cli_main(["shards", *args, "--out", str(d / "local")]) == 0
    ref = _shard_set(d / "local")
    assert len(ref[0]) == 4 and ref[1]["written"] == 15
    return d, args, ref


@pytest.mark.slow
def test_shard_job_array_writes_what_a_local_run_writes(slurm_cluster, shard_reference, capsys):
    d, args, ref = shard_reference
    assert cli_main(["submit", "shards", "--parts", "3", *args, "--out", str(d / "array"), "--wait"]) == 0
    out = capsys.readouterr().out
    assert "job array" in out and out.count(": completed") == 3, out
    assert len(_record(d / "array")["job_ids"]) == 3
    assert _shard_set(d / "array") == ref


@pytest.mark.slow
def test_sbatch_template_array_writes_what_a_local_run_writes(slurm_cluster, shard_reference):
    """slurm/templates/shards_array.sbatch, submitted with plain sbatch (no submitit)."""
    import sys

    d, args, ref = shard_reference
    env = {**os.environ, "BATON_PYTHON": sys.executable}
    proc = subprocess.run(["sbatch", "--parsable", "--array=0-1", "--cpus-per-task=1", f"--chdir={d}", "--time=5",
                           str(REPO / "slurm" / "templates" / "shards_array.sbatch"), *args, "--out",
                           str(d / "template")], env=env, capture_output=True, text=True, timeout=60, check=True)
    array_id = proc.stdout.strip().split(";")[0]

    def states() -> list[str]:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", array_id, "-o", "State"], capture_output=True, text=True)
        return out.stdout.split()

    running = {"PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING"}
    _wait_until(lambda: len(states()) == 2 and not running & set(states()), 240,
                f"array job {array_id}", poll=1.0)
    logs = "".join(p.read_text() for p in d.glob("slurm-baton-shards-*.out"))
    assert states() == ["COMPLETED", "COMPLETED"], logs
    assert len(list(d.glob("slurm-baton-shards-*.out"))) == 2, logs
    assert "shards --part 0/2" in logs and "shards --part 1/2" in logs, logs
    assert _shard_set(d / "template") == ref


@pytest.mark.slow
def test_local_executor_runs_the_same_job_without_a_cluster(shard_reference, capsys):
    d, args, ref = shard_reference
    assert cli_main(["submit", "shards", *args, "--out", str(d / "local_executor"), "cluster.executor=local"]) == 0
    assert ": completed" in capsys.readouterr().out
    assert _shard_set(d / "local_executor") == ref


@pytest.mark.slow
def test_failing_job_reports_the_error_and_the_log(slurm_cluster, tmp_path, synthetic_shards, capsys):
    cfg = write_tiny_config(tmp_path / "c.yaml", tmp_path / "run", tmp_path / "no-such-shards")
    assert cli_main(["submit", "pretrain", str(cfg), "cluster.time=5", "--wait"]) == 1
    out = capsys.readouterr().out
    assert "failed: " in out and "no-such-shards" in out, out
    log_path = Path(out.split("log: ")[1].split()[0])
    assert log_path.is_file() and "no-such-shards" in log_path.read_text()
    assert cli_main(["status", str(tmp_path / "run")]) == 1
    assert "no-such-shards" in capsys.readouterr().out


@pytest.mark.slow
def test_cancelled_job_is_reported_cancelled(slurm_cluster, tmp_path, synthetic_shards, capsys):
    from slurm.control import jobs_of, wait

    cfg = write_tiny_config(tmp_path / "c.yaml", tmp_path / "run", synthetic_shards, train={"epochs": 1000})
    assert cli_main(["submit", "pretrain", str(cfg), "cluster.time=10"]) == 0
    job_id = _record(tmp_path / "run")["job_ids"][0]
    _wait_until(lambda: _sacct_state(job_id) == "RUNNING", 240, f"job {job_id} to start")
    capsys.readouterr()
    assert cli_main(["status", str(tmp_path / "run"), "--wait", "--timeout", "2"]) == 124
    assert "still running after 2 s" in capsys.readouterr().out
    assert cli_main(["cancel", str(tmp_path / "run")]) == 0
    (out,) = wait(jobs_of(_record(tmp_path / "run")), timeout_s=120)
    assert out.state == "CANCELLED", out.message
    capsys.readouterr()
    assert cli_main(["status", str(tmp_path / "run")]) == 1
    assert "cancelled" in capsys.readouterr().out


@pytest.mark.slow
def test_finetune_job_trains_the_exported_backbone_and_evaluates(clip_jobs, tmp_path, capsys):
    """The handoff's other side on the cluster: the 2-task pretraining run's export finetuned by a job."""
    from conftest import make_synthetic_shards
    from test_finetune import overrides

    run = clip_jobs["full"]
    assert cli_main(["status", str(run), "--wait"]) == 0
    assert cli_main(["export", str(run), str(tmp_path / "backbone")]) == 0
    make_synthetic_shards(tmp_path / "data" / "train", per_class=4, seed=0)
    make_synthetic_shards(tmp_path / "data" / "test", per_class=3, seed=1)
    (tmp_path / "ft.yaml").write_text("cluster: {time: 10}\n")   # a recipe's cluster: section is taken out
    args = overrides(tmp_path, tmp_path / "backbone", "ft", "train.epochs=1")
    assert cli_main(["submit", "finetune", str(tmp_path / "ft.yaml"), *args]) == 0
    assert cli_main(["status", str(tmp_path / "ft"), "--wait", "--timeout", "300"]) == 0
    assert "completed" in capsys.readouterr().out
    record = _record(tmp_path / "ft")
    assert record["executor"] == "slurm" and record["tasks"] == 1
    ev = json.loads((tmp_path / "ft" / "eval.json").read_text())
    assert ev["n_classes"] == 16 and 0 < ev["recall@1"] <= 1
    assert (tmp_path / "ft" / "model" / "model.safetensors").is_file()
    assert [r["step"] for r in read_metrics(tmp_path / "ft" / "metrics.jsonl") if "loss" in r] == [2, 4, 6, 8]
