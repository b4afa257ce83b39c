"""What runs in each task of a submitted job: one stage, made preemption-safe.

Slurm (`#SBATCH --signal=USR2@90`, or `scancel --signal=USR2` on preemption) sends USR2 to every
task. submitit's own handler would requeue and exit at once, mid-step, losing the step and maybe a
half-written collective; here USR2 is routed to `baton.preemption.request_stop` instead, so every
rank finishes its step, the stage writes a checkpoint and returns EXIT_STOPPED. Then rank 0
requeues the job (`scontrol requeue`, as submitit does), every task exits without a result, and
the next attempt (SLURM_RESTART_COUNT + 1) runs the same stage in the same run directory with
`resume=latest`. Each attempt writes one line to the run's log.txt with its restart count.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass

from baton.errors import BatonError
from baton.logs import get_logger, setup_logging
from baton.preemption import EXIT_STOPPED, install_stop_signals
from baton.stages import COMMANDS, takes_config
from slurm.environment import export_torch_env


class StageFailed(RuntimeError):
    """The stage ended with an error; the message is the stage's own (a BatonError's text)."""


def run_stage(stage: str, argv: list[str]) -> int:
    """Run `baton STAGE ARGV` in this process through the CLI's table; a BatonError becomes StageFailed."""
    try:
        return int(COMMANDS[stage](argv) or 0)
    except BatonError as e:
        raise StageFailed(f"baton {stage}: {e}") from None


def requeue_self() -> None:
    """Put this job back in the queue (Slurm kills the current attempt and starts the next)."""
    job_id = os.environ["SLURM_JOB_ID"]
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)


@dataclass
class StageJob:
    """The picklable callable that submitit runs in every task (and `slurm.task` runs under srun)."""

    stage: str
    argv: list[str]
    cwd: str
    run_dir: str | None = None
    max_restarts: int = 20

    def __call__(self) -> dict:
        os.chdir(self.cwd)  # relative paths in configs mean what they meant at submission
        on_slurm = "SLURM_JOB_ID" in os.environ
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        env = export_torch_env()
        install_stop_signals((signal.SIGUSR2,))
        rank = int(env["RANK"])
        argv = list(self.argv)
        if restarts and takes_config(self.stage):
            argv.append("resume=latest")
        job_id = os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID", "?")
        if self.run_dir and rank == 0:
            setup_logging(self.run_dir, 0)
            get_logger("baton.slurm").info(
                "slurm job %s: %s, restarts: %d, %s tasks (master %s:%s)", job_id,
                "resumed with resume=latest" if restarts else "first attempt", restarts,
                env["WORLD_SIZE"], env["MASTER_ADDR"], env["MASTER_PORT"])

        code = run_stage(self.stage, argv)
        if code == EXIT_STOPPED:
            log = get_logger("baton.slurm")
            if not on_slurm:
                log.warning("stopped on request with a checkpoint; not under Slurm, so not requeued")
                return {"stage": self.stage, "rank": rank, "restarts": restarts, "stopped": True}
            if restarts >= self.max_restarts:
                raise StageFailed(f"baton {self.stage} was stopped {restarts + 1} times; not requeued past "
                                  f"cluster.max_restarts={self.max_restarts}. Continue with resume=latest.")
            if rank == 0:
                log.info("stopped with a checkpoint: requeueing job %s (restart %d)", job_id, restarts + 1)
                requeue_self()
            raise SystemExit(EXIT_STOPPED)  # no result: the job is not over
        if code != 0:
            raise StageFailed(f"baton {self.stage} exited with status {code}")
        return {"stage": self.stage, "rank": rank, "restarts": restarts, "stopped": False}
