"""Slurm: `baton submit` against a real single-node cluster (munge, MariaDB, slurmdbd, slurmctld,
slurmd started by slurm/local_cluster/start.sh, once per session, stopped at the end).

- a 2-task CLIP pretraining job trains, checkpoints, and its run exports;
- the same job preempted mid-run (`scancel --signal=USR2`) checkpoints, requeues itself, resumes
  and ends with the same weights as the uninterrupted job, tensor by tensor;
- shard preparation as a job array over parts writes the same bytes as a local run;
- a failing job reports the stage's error with the log path; a cancelled job is reported cancelled.

Skipped (with the reason) where the cluster cannot be installed: not root, not Debian, no apt-get.
The cluster-free parts (the sbatch script, the environment mapping, the options) always run.
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
from baton.errors import BatonError
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


# ---------------------------------------------------------------- no cluster needed

def test_dry_run_prints_the_sbatch_script_with_every_option(tmp_path, synthetic_shards, capsys):
    cfg = write_tiny_config(tmp_path / "c.yaml", tmp_path / "run", synthetic_shards)
    # the recipe's cluster section comes through its `base:` file
    (tmp_path / "site.yaml").write_text("cluster:\n  partition: gpu\n  nodes: 3\n  mem: 64G\n")
    cfg.write_text("base: site.yaml\n" + cfg.read_text())
    cluster_file = tmp_path / "cluster.yaml"
    cluster_file.write_text("account: vision\nqos: high\nnodes: 2\nsetup: ['module load cuda']\n")
    argv = ["submit", "pretrain", str(cfg), "train.epochs=3", "--cluster", str(cluster_file),
            "cluster.gpus_per_node=4", "cluster.tasks_per_node=4", "cluster.cpus_per_task=8",
            "cluster.time=1-02:00:30", "cluster.constraint=a100", "cluster.job_name=clip",
            "cluster.extra_sbatch=[--exclusive,--reservation=big]", "--dry-run"]
    assert cli_main(argv) == 0
    script = capsys.readouterr().out
    lines = set(script.splitlines())
    run = (tmp_path / "run").resolve()
    expected = ["#SBATCH --nodes=2",  # --cluster FILE over the YAML's section; command line over both
                "#SBATCH --partition=gpu", "#SBATCH --mem=64G", "#SBATCH --account=vision", "#SBATCH --qos=high",
                "#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=4", "#SBATCH --cpus-per-task=8",
                f"#SBATCH --time={26 * 60 + 1}", "#SBATCH --constraint=a100", "#SBATCH --job-name=clip",
                "#SBATCH --exclusive", "#SBATCH --reservation=big", "#SBATCH --requeue",
                "#SBATCH --signal=USR2@90", f"#SBATCH --output={run}/slurm/%j/%j_0_log.out", "module load cuda"]
    for line in expected:
        assert line in lines, (line, script)
    assert f"-m submitit.core._submit {run}/slurm/%j" in script and script.startswith("#!/bin/bash")
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
    from omegaconf import OmegaConf

    from slurm.submit import plan
    frozen = OmegaConf.create(plan("pretrain", [str(cfg)])["config_text"])   # what a requeued job reads
    assert "base" not in frozen and "cluster" not in frozen and frozen.run_dir == str(tmp_path / "run")

    assert cli_main(["submit", "shards", "--parts", "3", "folder", str(tmp_path), "--out", str(tmp_path / "s"),
                     "--dry-run"]) == 0
    assert "#SBATCH --array=0-2%3" in capsys.readouterr().out.splitlines()


def test_dry_run_needs_no_slurm_on_this_machine(tmp_path, synthetic_shards, capsys, monkeypatch):
    """A laptop without Slurm prepares a job for a cluster: no srun or sbatch on PATH."""
    cfg = write_tiny_config(tmp_path / "c.yaml", tmp_path / "run", synthetic_shards)
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert shutil.which("srun") is None and shutil.which("sbatch") is None
    assert cli_main(["submit", "pretrain", str(cfg), "cluster.partition=gpu", "--dry-run"]) == 0
    script = capsys.readouterr().out
    assert script.startswith("#!/bin/bash") and "#SBATCH --partition=gpu" in script.splitlines()
    assert "srun" in script  # the job itself still runs its tasks under srun on the cluster
    assert cli_main(["submit", "pretrain", str(cfg)]) != 0  # a real submission still needs Slurm
    assert "sbatch not found" in capsys.readouterr().err


def test_print_config_prints_what_the_job_runs_and_submits_nothing(tmp_path, synthetic_shards, capsys, monkeypatch):
    """`baton submit STAGE CONFIG ... --print-config`: the stage's resolved config (recipe + overrides,
    the absolute run_dir the job gets) and the cluster options; a recipe `baton submit` takes back."""
    from omegaconf import OmegaConf

    from baton.config import load_config, to_yaml
    from pretrain.config import PretrainConfig

    cfg = write_tiny_config(tmp_path / "c.yaml", tmp_path / "run", synthetic_shards)
    run = (tmp_path / "run").resolve()
    want = load_config(PretrainConfig, cfg, ["train.epochs=3", "optim.lr=0.01", f"run_dir={run}"])
    cfg.write_text(cfg.read_text() + "cluster:\n  partition: gpu\n  nodes: 3\n")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch: nothing could be submitted anyway
    argv = ["submit", "pretrain", str(cfg), "train.epochs=3", "--print-config", "cluster.nodes=2", "optim.lr=0.01"]
    assert cli_main(argv) == 0
    printed = OmegaConf.create(capsys.readouterr().out)
    cluster = printed.pop("cluster")
    assert cluster.nodes == 2 and cluster.partition == "gpu" and cluster.executor == "slurm"
    assert OmegaConf.to_yaml(printed) == to_yaml(want)
    assert printed.train.epochs == 3 and printed.optim.lr == 0.01 and printed.run_dir == str(run)
    assert not run.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]
    # what it printed is itself a recipe for the same submission
    (tmp_path / "again.yaml").write_text(OmegaConf.to_yaml(OmegaConf.merge(printed, {"cluster": cluster})))
    assert cli_main(["submit", "pretrain", str(tmp_path / "again.yaml"), "--print-config"]) == 0
    assert OmegaConf.create(capsys.readouterr().out) == OmegaConf.merge(printed, {"cluster": cluster})
    assert cli_main(["submit", "pretrain", str(cfg), "train.epochz=3", "--print-config"]) == 2
    assert "train.epochz" in capsys.readouterr().err
    assert cli_main(["submit", "shards", "folder", str(tmp_path), "--out", str(tmp_path / "s"), "--print-config"]) == 2
    assert "--dry-run prints its sbatch script" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["cluster.nodez=2"], "unknown config key 'nodez'"),
    (["cluster.nodes=two"], "cluster.nodes"),
    (["cluster.time=soon"], "cluster.time='soon'"),
    (["cluster.executor=kubernetes"], "unknown cluster.executor 'kubernetes': choose one of slurm, local"),
    (["train.epochz=2"], "unknown config key 'train.epochz'"),
    (["cluster.extra_sbatch=[exclusive]"], "not a long sbatch option"),
])
def test_bad_submissions_are_refused_before_queueing(tmp_path, synthetic_shards, capsys, argv, needle):
    cfg = write_tiny_config(tmp_path / "c.yaml", tmp_path / "run", synthetic_shards)
    assert cli_main(["submit", "pretrain", str(cfg), *argv, "--dry-run"]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_slurm_environment_maps_to_torch_distributed(monkeypatch):
    from slurm.environment import export_torch_env

    slurm_vars = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                  "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]",
                  "SLURM_RESTART_COUNT": "0"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "SUBMITIT_EXECUTOR", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.setenv(name, "unset-by-test")  # restored afterwards, whatever the mapping writes
        monkeypatch.delenv(name)
    for k, v in slurm_vars.items():
        monkeypatch.setenv(k, v)
    env = export_torch_env()
    assert {k: os.environ[k] for k in env} == env
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("5", "8", "1", "4")
    assert env["MASTER_ADDR"] == "gpu07"  # the first node of the allocation, on every task
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # Slurm's GPU binding is left alone
    first = env["MASTER_PORT"]
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert export_torch_env()["MASTER_PORT"] == first  # every task agrees on the port
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert export_torch_env()["MASTER_PORT"] != first  # a requeued attempt gets a fresh one


def test_cluster_options_shorthand_and_time_formats(tmp_path):
    from slurm.cluster import load_cluster, time_minutes

    assert load_cluster("local").executor == "local"  # `cluster: local` in a stage's YAML
    (tmp_path / "c.yaml").write_text("cluster: {nodes: 4, partition: big}\n")  # a file with a cluster: key
    cfg = load_cluster({"nodes": 2, "qos": "low"}, tmp_path / "c.yaml", ["cluster.qos=high"])
    assert (cfg.nodes, cfg.partition, cfg.qos, cfg.executor) == (4, "big", "high", "slurm")

    assert [time_minutes(t) for t in ("90", "30:00", "30:01", "2:00:00", "1-0", "1-01:30", "0:59")] == \
        [90, 30, 31, 120, 1440, 1530, 1]
    with pytest.raises(BatonError, match="cluster.time"):
        time_minutes("1h")


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
