"""`baton submit` without a cluster: the sbatch script of `--dry-run` with every option (needing no
Slurm on this machine), `--print-config`, the submissions refused before queueing, the Slurm-to-
torch.distributed environment mapping and the cluster options. Against a real cluster:
tests/test_slurm.py."""

from __future__ import annotations

import os
import shutil

import pytest

from baton.cli import main as cli_main
from baton.errors import BatonError
from test_pretrain import write_tiny_config


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
