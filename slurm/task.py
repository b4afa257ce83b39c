"""`python -m slurm.task STAGE ARGS...`: one task of a hand-written sbatch/srun job (see
slurm/templates/), doing what a `baton submit` task does without submitit's pickles: map the Slurm
environment to torch.distributed, turn USR2 into a checkpoint + requeue, resume after a restart.

In a job array, `shards` gets `--part ID/COUNT` from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT.
Exit status: 0 done, 2 the stage's error (printed), 3 stopped and requeued.
"""

from __future__ import annotations

import os
import sys

from baton.errors import BatonError
from baton.stages import JOB_STAGES, takes_config
from slurm.job import StageFailed, StageJob

USAGE = f"usage: srun python -m slurm.task {{{','.join(JOB_STAGES)}}} ARGS...   (see slurm/templates/)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    stage, args = argv[0], argv[1:]
    try:
        from slurm.submit import stage_config

        JOB_STAGES.spec(stage)   # an unknown stage: the error lists the stages
        run_dir = None
        if takes_config(stage):
            run_dir = str(stage_config(stage, args)[1].run_dir)
        elif "SLURM_ARRAY_TASK_ID" in os.environ and not any(a.startswith("--part") for a in args):
            part = f"{os.environ['SLURM_ARRAY_TASK_ID']}/{os.environ['SLURM_ARRAY_TASK_COUNT']}"
            print(f"slurm.task: array element {os.environ['SLURM_ARRAY_TASK_ID']}: shards --part {part}", flush=True)
            args += ["--part", part]
        StageJob(stage, args, os.getcwd(), run_dir, int(os.environ.get("BATON_MAX_RESTARTS", "20")))()
    except (BatonError, StageFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
