"""`baton submit STAGE ARGS... [cluster.KEY=VALUE ...] [--cluster FILE] [--dry-run] [--print-config] [--wait] [--parts N]`

    baton submit pretrain configs/clip_vit_b16.yaml cluster.nodes=2 cluster.gpus_per_node=8 \
        cluster.tasks_per_node=8 cluster.partition=gpu train.epochs=32
    baton submit shards --parts 8 folder /data/tree --out /data/shards     # a job array of 8 parts
    baton submit pretrain configs/demo_clip.yaml cluster.executor=local --wait   # no cluster: debug

ARGS are what `baton STAGE` takes. For pretrain/finetune the YAML's `cluster:` section is taken out
(the stage's schema does not know it) and the rest is frozen in RUN_DIR/slurm/config.yaml, so a
requeued attempt reads the config the job was submitted with, not a file edited since.
The job record (ids, log folder) goes to RUN_DIR/slurm/job.json for `baton status|cancel|logs`.
`--dry-run` prints the sbatch script, `--print-config` the config the job's stage will run with (its
run_dir resolved, the cluster options as a `cluster:` section: a recipe `baton submit` takes back);
neither submits nor writes anything.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from baton.compat import submitit_sbatch_text
from baton.config import load_config, read_recipe, to_yaml
from baton.errors import BatonError
from baton.io import write_text_atomic
from baton.stages import JOB_STAGES, takes_config
from slurm.cluster import ClusterConfig, executor_parameters, load_cluster
from slurm.control import error_text, report, wait, write_record
from slurm.job import StageJob

USAGE = __doc__.split("\n\n")[0]


def _split(argv: list[str]) -> tuple[dict[str, Any], list[str], list[str]]:
    """Our flags, the cluster.KEY=VALUE overrides, and the stage's own arguments (the rest, in order)."""
    flags: dict[str, Any] = {"cluster": None, "dry_run": False, "print_config": False, "wait": False, "parts": None}
    cluster, rest = [], []
    it = iter(argv)
    for tok in it:
        if tok in ("--dry-run", "--print-config", "--wait"):
            flags[tok[2:].replace("-", "_")] = True
        elif tok in ("--cluster", "--parts") or tok.startswith(("--cluster=", "--parts=")):
            name, eq, value = tok.partition("=")
            if not eq:
                value = next(it, None)
                if value is None:
                    raise BatonError(f"{name} needs a value\n{USAGE}")
            flags[name[2:]] = value
        elif tok.startswith("cluster.") and "=" in tok:
            cluster.append(tok)
        else:
            rest.append(tok)
    return flags, cluster, rest


def stage_config(stage: str, rest: list[str]) -> tuple[str, Any, list[str], Any]:
    """(frozen YAML text, the validated stage config, overrides, the YAML's cluster section)."""
    if not rest or rest[0].startswith("-") or "=" in rest[0]:
        raise BatonError(f"baton submit {stage}: expected CONFIG [key=value ...] after the stage\n{USAGE}")
    path, overrides = Path(rest[0]), rest[1:]
    raw = read_recipe(path)   # its `base:` chain resolved: the frozen copy stands alone
    section = raw.pop("cluster", None) if OmegaConf.is_dict(raw) else None
    text = OmegaConf.to_yaml(raw)
    schema = JOB_STAGES[stage]
    with tempfile.TemporaryDirectory() as tmp:  # validate now: a bad key fails here, not in the queue
        (Path(tmp) / path.name).write_text(text)
        cfg = load_config(schema, Path(tmp) / path.name, overrides)
    return text, cfg, overrides, section


def _shards_out(rest: list[str]) -> Path:
    for i, tok in enumerate(rest):
        if tok == "--out" and i + 1 < len(rest):
            return Path(rest[i + 1])
        if tok.startswith("--out="):
            return Path(tok[len("--out="):])
    raise BatonError("baton submit shards: the shard arguments need --out DIR (where shards and the job record go)")


def plan(stage: str, argv: list[str]) -> dict[str, Any]:
    """Everything a submission needs, checked, without touching the cluster or the disk."""
    JOB_STAGES.spec(stage)   # an unknown stage: the error lists the stages
    flags, cluster_overrides, rest = _split(argv)
    cwd = os.getcwd()
    if takes_config(stage):
        if flags["parts"] is not None:
            raise BatonError("--parts is for `baton submit shards` (a job array over shard parts)")
        text, cfg, overrides, section = stage_config(stage, rest)
        run_dir = Path(cfg.run_dir).resolve()
        ccfg = load_cluster(section, flags["cluster"], cluster_overrides)
        frozen = run_dir / "slurm" / "config.yaml"
        jobs = [StageJob(stage, [str(frozen), *overrides, f"run_dir={run_dir}"], cwd, str(run_dir),
                         ccfg.max_restarts)]
    else:
        if any(t == "--part" or t.startswith("--part=") for t in rest):
            raise BatonError("baton submit shards: use --parts N (a job array of N parts), not --part I/N")
        parts_text = str(flags["parts"] or 1)
        parts = int(parts_text) if parts_text.isdigit() else 0
        if parts < 1:
            raise BatonError(f"--parts {flags['parts']}: expected a positive number of parts")
        text, run_dir = None, _shards_out(rest).resolve()
        ccfg = load_cluster(None, flags["cluster"], cluster_overrides)
        if ccfg.nodes * ccfg.tasks_per_node != 1:
            raise BatonError("baton submit shards: each part is one task (use --parts N and the shard "
                             "command's --workers for more processes), not cluster.nodes/tasks_per_node > 1")
        jobs = [StageJob("shards", [*rest, "--part", f"{i}/{parts}"], cwd, None, ccfg.max_restarts)
                for i in range(parts)]
    log_folder = Path(ccfg.log_folder).resolve() if ccfg.log_folder else run_dir / "slurm"
    return {"stage": stage, "argv": list(argv), "flags": flags, "cluster": ccfg, "run_dir": run_dir, "config_text": text,
            "config": cfg if takes_config(stage) else None, "jobs": jobs, "log_folder": log_folder}


def resolved_config(p: dict[str, Any]) -> str:
    """What `--print-config` prints: the stage's config as the job runs it (the frozen recipe +
    overrides, `run_dir` made absolute as the job gets it) and the cluster options under `cluster:`."""
    if p["config"] is None:
        raise BatonError(f"--print-config prints the config of a stage that takes one "
                         f"({', '.join(s for s in JOB_STAGES if takes_config(s))}); `baton submit "
                         f"{p['stage']}` has none: --dry-run prints its sbatch script")
    cfg = dataclasses.replace(p["config"], run_dir=str(p["run_dir"]))
    cluster = OmegaConf.to_yaml({"cluster": OmegaConf.to_container(OmegaConf.structured(p["cluster"]))})
    return to_yaml(cfg) + cluster


def make_executor(ccfg: ClusterConfig, log_folder: Path, job_name: str):
    import submitit

    if ccfg.executor == "slurm" and shutil.which("sbatch") is None:
        raise BatonError("sbatch not found: submit from a Slurm login node, start the local test cluster "
                         "(slurm/local_cluster/start.sh), or debug with cluster.executor=local")
    ex = submitit.AutoExecutor(folder=str(log_folder / "%j"), cluster=ccfg.executor)
    ex.update_parameters(**executor_parameters(ccfg, job_name))
    return ex


def _script_only_executor(folder: Path):
    """submitit's SlurmExecutor, for writing the sbatch script only. Its constructor refuses to run
    where `srun` is not on PATH, but a dry run is what a laptop preparing a job for a cluster does:
    nothing is submitted, so that check does not apply."""
    from submitit.slurm.slurm import SlurmExecutor

    class ScriptOnlySlurmExecutor(SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:
            return 1

    return ScriptOnlySlurmExecutor(folder=str(folder))


def sbatch_script(p: dict[str, Any]) -> str:
    """The exact script submitit hands to sbatch for this plan (the same executor, not submitted)."""
    ccfg: ClusterConfig = p["cluster"]
    if ccfg.executor != "slurm":
        raise BatonError("--dry-run prints the sbatch script: not available with cluster.executor=local")
    slurm_ex = _script_only_executor(p["log_folder"] / "%j")
    params = executor_parameters(ccfg, f"baton-{p['stage']}")
    generic = {k: v for k, v in params.items() if not k.startswith("slurm_")}
    specific = {k[len("slurm_"):]: v for k, v in params.items() if k.startswith("slurm_")}
    # generic names translated as AutoExecutor does, slurm_* passed as they are; an array's map_count
    # as submitit's own array submission sets it
    return submitit_sbatch_text(slurm_ex, generic, specific, len(p["jobs"]) if len(p["jobs"]) > 1 else None)


def submit(p: dict[str, Any]) -> tuple[dict[str, Any], list]:
    """Submit a `plan`; returns (the job record, the submitit jobs)."""
    stage = p["stage"]
    ccfg: ClusterConfig = p["cluster"]
    run_dir, log_folder = p["run_dir"], p["log_folder"]
    if p["config_text"] is not None:
        write_text_atomic(run_dir / "slurm" / "config.yaml", p["config_text"])
    log_folder.mkdir(parents=True, exist_ok=True)
    ex = make_executor(ccfg, log_folder, f"baton-{stage}")
    if len(p["jobs"]) == 1:
        jobs = [ex.submit(p["jobs"][0])]
    else:
        with ex.batch():
            jobs = [ex.submit(j) for j in p["jobs"]]
    record = {"stage": stage, "argv": [stage, *p["argv"]], "executor": ccfg.executor,
              "job_ids": [str(j.job_id) for j in jobs], "tasks": ccfg.nodes * ccfg.tasks_per_node,
              "log_folder": str(log_folder / "%j"), "run_dir": str(run_dir),
              "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_record(run_dir / "slurm", record)
    return record, jobs


def _local_outcomes(jobs: list) -> int:
    """Wait for jobs of submitit's local executor (not tracked by sacct) and report them."""
    code = 0
    for j in jobs:
        try:
            j.results()
            print(f"job {j.job_id}: completed")
        except Exception:  # submitit's FailedJobError / UncompletedJobError
            print(f"job {j.job_id}: failed: {error_text(j)}\n  log: {j.paths.stderr}")
            code = 1
    return code


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    p = plan(argv[0], argv[1:])
    if p["flags"]["print_config"]:
        print(resolved_config(p), end="")
        return 0
    if p["flags"]["dry_run"]:
        print(sbatch_script(p))
        return 0
    record, jobs = submit(p)
    stage = p["stage"]
    what = f"job array {record['job_ids'][0].split('_')[0]} ({len(jobs)} parts)" if len(jobs) > 1 \
        else f"job {record['job_ids'][0]}"
    print(f"submitted {stage} as {what}; record: {record['run_dir']}/slurm/job.json; logs: {record['log_folder']}")
    sys.stdout.flush()
    if record["executor"] == "local":
        return _local_outcomes(jobs)
    if p["flags"]["wait"]:
        return report(wait(jobs))
    print(f"follow it with: baton status {record['run_dir']} | baton logs {record['run_dir']} -f | "
          f"baton cancel {record['run_dir']}")
    return 0

