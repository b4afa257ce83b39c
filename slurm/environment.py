"""The task's place in the job, as torch.distributed wants it.

`baton.distributed.init_distributed` reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT
(what torchrun sets). Under Slurm the same facts are in SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and
SLURM_JOB_NODELIST; under submitit's local executor in SUBMITIT_LOCAL_*. submitit's
`TorchDistributedEnvironment` reads either and exports the torch names; this module only chooses
the port and keeps CUDA_VISIBLE_DEVICES as Slurm set it (init_distributed picks the GPU by LOCAL_RANK).
"""

from __future__ import annotations

import os
import random


def master_port(job_id: str, restart: int) -> int:
    """One port per job and attempt, the same on every task: a requeued attempt does not meet the
    previous attempt's socket, and two jobs on one node rarely collide."""
    return random.Random(f"{job_id}/{restart}").randint(20000, 59999)


def export_torch_env() -> dict[str, str]:
    """Set RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the Slurm or
    submitit-local environment of this task; returns them."""
    from submitit.helpers import TorchDistributedEnvironment

    if "SUBMITIT_EXECUTOR" not in os.environ:  # an sbatch/srun script of ours, not a submitit job
        os.environ["SUBMITIT_EXECUTOR"] = "slurm" if "SLURM_JOB_ID" in os.environ else "local"
    job_id = os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID", "0")
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    os.environ["MASTER_PORT"] = str(master_port(job_id, restart))
    env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    names = {"RANK": env.rank, "WORLD_SIZE": env.world_size, "LOCAL_RANK": env.local_rank,
             "LOCAL_WORLD_SIZE": env.local_world_size, "MASTER_ADDR": env.master_addr,
             "MASTER_PORT": env.master_port}
    return {k: str(v) for k, v in names.items()}
