"""Slurm for every stage: `baton submit STAGE ...` sends a stage to a Slurm cluster through
submitit (or runs it through submitit's local executor with `cluster: local`), one task per
process, with the Slurm environment mapped to torch.distributed, preemption turned into a
checkpoint + requeue + `resume=latest`, and status / cancel / logs commands for the run.

- `cluster.py`      the `cluster:` options (ClusterConfig) and their submitit parameters
- `environment.py`  Slurm / submitit task environment -> RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*
- `job.py`          what runs in each task: the stage, stop-on-signal, requeue on EXIT_STOPPED
- `submit.py`       `baton submit` (and `--dry-run`, the exact sbatch script)
- `control.py`      the job record in the run directory; `baton status|cancel|logs`
- `task.py`         `python -m slurm.task STAGE ...`: the same job for hand-written sbatch scripts
- `templates/`      such sbatch scripts; `local_cluster/` a real one-node cluster for tests
"""
