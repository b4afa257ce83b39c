"""Cluster options: the `cluster:` section of a stage's YAML, a `--cluster FILE`, and
`cluster.KEY=VALUE` on the command line, merged in that order into one typed `ClusterConfig`.

`cluster: local` (or `cluster.executor=local`) runs the same job through submitit's local executor,
for debugging a submission without a cluster.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from baton.config import explain_config_error, read_yaml
from baton.errors import BatonError
from baton.registry import Registry

# cluster.executor -> the submitit executor that `submitit.AutoExecutor(cluster=NAME)` launches with
EXECUTORS = Registry("cluster.executor", {
    "slurm": "submitit.slurm.slurm:SlurmExecutor",
    "local": "submitit.local.local:LocalExecutor",   # submitit's local executor, for debugging
})


@dataclass
class ClusterConfig:
    executor: str = "slurm"                 # slurm | local (submitit's local executor, for debugging)
    nodes: int = 1
    tasks_per_node: int = 1                 # one process per task: usually one per GPU
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem: Optional[str] = None               # per node, Slurm syntax: 16G, 500M
    time: str = "60"                        # minutes, or [D-]HH:MM[:SS]
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    extra_sbatch: list[str] = field(default_factory=list)   # e.g. ["--exclusive", "--reservation=big"]
    setup: list[str] = field(default_factory=list)          # shell lines before srun (module load, ...)
    job_name: Optional[str] = None          # default: baton-STAGE
    log_folder: Optional[str] = None        # default: RUN_DIR/slurm
    signal_delay_s: int = 90                # USR2 this long before the time limit: checkpoint + requeue
    max_restarts: int = 20                  # requeues on preemption / time limit before giving up


def time_minutes(text: str) -> int:
    """Slurm's time formats (minutes, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]) as whole minutes (at least 1)."""
    t = str(text).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", t)
    if not m:
        raise BatonError(f"cluster.time={text!r}: expected minutes or [D-]HH:MM[:SS], e.g. 90 or 1-12:00:00")
    days, a, b, c = (int(x) if x else None for x in m.groups())
    if days is not None:   # D-HH, D-HH:MM, D-HH:MM:SS
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif b is None:         # MM
        seconds = a * 60
    elif c is None:         # MM:SS
        seconds = a * 60 + b
    else:                   # HH:MM:SS
        seconds = a * 3600 + b * 60 + c
    return max(1, -(-seconds // 60))


def _section(node: Any, source: str) -> dict:
    """A `cluster:` value as a dict: `local`/`slurm` is shorthand for {executor: ...}."""
    if node is None:
        return {}
    if isinstance(node, str):
        return {"executor": node}
    if OmegaConf.is_dict(node):
        return OmegaConf.to_container(node)
    if isinstance(node, dict):
        return node
    raise BatonError(f"{source}: 'cluster' must be a mapping of options or one of {', '.join(EXECUTORS)}")


def load_cluster(section: Any = None, cluster_file: str | Path | None = None,
                 overrides: Sequence[str] = ()) -> ClusterConfig:
    """Merge defaults < the config's `cluster:` section < `cluster_file` < `cluster.KEY=VALUE` overrides."""
    merged = OmegaConf.structured(ClusterConfig)
    OmegaConf.set_struct(merged, True)
    layers: list[tuple[str, dict]] = [("cluster section", _section(section, "config"))]
    if cluster_file is not None:
        path = Path(cluster_file)
        raw = read_yaml(path, "a YAML file of cluster options")
        layers.append((str(path), _section(raw.get("cluster", raw) if OmegaConf.is_dict(raw) else raw, str(path))))
    for source, values in layers:
        try:
            merged = OmegaConf.merge(merged, values)
        except OmegaConfBaseException as e:
            raise explain_config_error(ClusterConfig, e, source) from None
    for item in overrides:
        key, _, value = item.partition("=")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([f"{key[len('cluster.'):]}={value}"]))
        except OmegaConfBaseException as e:
            raise explain_config_error(ClusterConfig, e, f"override '{item}'") from None
    cfg: ClusterConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    EXECUTORS.spec(cfg.executor)   # an unknown executor: the error lists them
    for name in ("nodes", "tasks_per_node", "cpus_per_task", "max_restarts"):
        if getattr(cfg, name) < (0 if name == "max_restarts" else 1):
            raise BatonError(f"cluster.{name}={getattr(cfg, name)} must be positive")
    time_minutes(cfg.time)
    for line in cfg.extra_sbatch:
        if not line.startswith("--"):
            raise BatonError(f"cluster.extra_sbatch: {line!r} is not a long sbatch option (--name or --name=value)")
    return cfg


def executor_parameters(cfg: ClusterConfig, job_name: str) -> dict[str, Any]:
    """`AutoExecutor.update_parameters` arguments: generic ones, plus `slurm_*` for Slurm only."""
    params: dict[str, Any] = {"name": cfg.job_name or job_name, "nodes": cfg.nodes,
                              "tasks_per_node": cfg.tasks_per_node, "cpus_per_task": cfg.cpus_per_task,
                              "timeout_min": time_minutes(cfg.time)}
    if cfg.gpus_per_node:
        params["gpus_per_node"] = cfg.gpus_per_node
    if cfg.executor == "slurm":
        extra: dict[str, Any] = {"requeue": True}  # eligible for `scontrol requeue` after a stop
        for line in cfg.extra_sbatch:
            key, eq, value = line[2:].partition("=")
            extra[key] = value if eq else True
        slurm = {"partition": cfg.partition, "account": cfg.account, "qos": cfg.qos,
                 "constraint": cfg.constraint, "mem": cfg.mem, "signal_delay_s": cfg.signal_delay_s,
                 "setup": list(cfg.setup) or None, "additional_parameters": extra}
        params.update({f"slurm_{k}": v for k, v in slurm.items() if v is not None})
    return params
