"""A submitted run's job record (`RUN_DIR/slurm/job.json`) and the commands that read it:
`baton status RUN_DIR`, `baton cancel RUN_DIR`, `baton logs RUN_DIR [-f] [-n N] [--task T] [--stderr]`.

States come from Slurm accounting through submitit (sacct): a cancelled job is reported as
cancelled, a failed one with the stage's error and the path of the log that holds the rest.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from baton.errors import BatonError
from baton.io import write_json_atomic

RECORD = "job.json"
UNFINISHED = ("READY", "PENDING", "RUNNING", "UNKNOWN", "REQUEUED", "COMPLETING", "PREEMPTED",
              "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED", "CONFIGURING")


def write_record(folder: Path, record: dict[str, Any]) -> Path:
    write_json_atomic(folder / RECORD, record)
    return folder / RECORD


def read_record(run_dir: str | Path) -> dict[str, Any]:
    """The job record of a run directory (or of the job folder itself, or of the job.json path)."""
    p = Path(run_dir)
    for candidate in (p / "slurm" / RECORD, p / RECORD, p):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise BatonError(f"no submitted job recorded for {p}: expected {p / 'slurm' / RECORD} "
                     f"(written by `baton submit`; pass the run directory, or --out of a shards job)")


def jobs_of(record: dict[str, Any]) -> list:
    """submitit job handles for the record's jobs (one per array element), usable from any process."""
    import submitit

    if record["executor"] != "slurm":
        job_id = record["job_ids"][0]
        raise BatonError(f"job {job_id} ran with submitit's local executor: it is not tracked by a scheduler; "
                         f"see its logs in {record['log_folder'].replace('%j', job_id)}")
    tasks = list(range(record.get("tasks", 1)))
    return [submitit.SlurmJob(folder=record["log_folder"], job_id=jid, tasks=tasks) for jid in record["job_ids"]]


@dataclass
class Outcome:
    job_id: str
    state: str          # Slurm's state word: COMPLETED, FAILED, CANCELLED, RUNNING, PENDING, ...
    message: str        # one line for the user (with the log path when something went wrong)
    stdout: Path
    stderr: Path

    @property
    def done(self) -> bool:
        return self.state not in UNFINISHED

    @property
    def ok(self) -> bool:
        return self.state == "COMPLETED"


def error_text(job) -> str:
    """The stage's error (its last line of traceback) from submitit's result file, else the stderr tail."""
    try:
        import submitit

        outcome, trace = submitit.core.utils.pickle_load(job.paths.result_pickle)
        if outcome == "error":
            lines = [ln for ln in str(trace).strip().splitlines() if ln.strip()]
            return lines[-1] if lines else "failed"
    except Exception:
        pass
    try:
        tail = [ln for ln in job.paths.stderr.read_text(errors="replace").splitlines() if ln.strip()]
        return tail[-1] if tail else "no error output"
    except OSError:
        return "no log written (the job may have failed before starting: check the partition/options)"


def outcome(job, force: bool = True) -> Outcome:
    """The job's current state; for a finished job the message says how it ended."""
    state = job.watcher.get_state(job.job_id, mode="force" if force else "standard").upper()
    word = state.split()[0] if state else "UNKNOWN"
    if word == "COMPLETED" and job.paths.result_pickle.exists() and not _result_ok(job):
        word = "FAILED"
    if word == "COMPLETED":
        msg = "completed"
    elif word == "CANCELLED":
        msg = f"cancelled ({state.lower()}); log: {job.paths.stdout}"
    elif word in UNFINISHED:
        msg = word.lower()
    else:
        msg = f"{word.lower()}: {error_text(job)}\n  log: {job.paths.stderr}"
    return Outcome(str(job.job_id), word, msg, job.paths.stdout, job.paths.stderr)


def _result_ok(job) -> bool:
    import submitit

    try:
        return submitit.core.utils.pickle_load(job.paths.result_pickle)[0] == "success"
    except Exception:
        return False


def wait(jobs: list, timeout_s: float | None = None, poll_s: float = 2.0) -> list[Outcome]:
    """Block until every job has ended (or `timeout_s`); returns their outcomes."""
    start = time.monotonic()
    while True:
        outs = [outcome(j) for j in jobs]
        if all(o.done for o in outs):
            return outs
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            return outs
        time.sleep(poll_s)


def report(outs: list[Outcome]) -> int:
    """Print one line per job; 0 if all completed, 1 if any failed/cancelled, 0 while running."""
    for o in outs:
        print(f"job {o.job_id}: {o.message}")
    return 1 if any(o.done and not o.ok for o in outs) else 0


# ------------------------------------------------------------------ commands

def status_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="baton status", description="state of a run submitted with baton submit")
    p.add_argument("run_dir", help="the run directory (or a shards job's --out)")
    p.add_argument("--wait", action="store_true", help="block until the job has ended")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="with --wait: stop waiting after SECONDS; exit 124 if a job is still running")
    args = p.parse_args(argv)
    if args.timeout is not None and (not args.wait or args.timeout <= 0):
        p.error("--timeout needs --wait and a positive number of seconds")
    record = read_record(args.run_dir)
    jobs = jobs_of(record)
    outs = wait(jobs, timeout_s=args.timeout) if args.wait else [outcome(j) for j in jobs]
    print(f"{record['stage']} job in {args.run_dir} (logs in {record['log_folder']})")
    restarts = restarts_of(record)
    if restarts:
        print(f"restarts (preemption / time limit): {restarts}")
    code = report(outs)
    if args.wait and not all(o.done for o in outs):
        print(f"still running after {args.timeout:g} s: `baton status {args.run_dir} --wait` waits again")
        return 124
    return code


def restarts_of(record: dict[str, Any]) -> int:
    """How many times the run was requeued, from the lines `slurm.job` writes to the run's log.txt."""
    log = Path(record["run_dir"]) / "log.txt"
    if not log.is_file():
        return 0
    counts = [int(line.split("restarts: ")[1].split(",")[0]) for line in log.read_text(errors="replace").splitlines()
              if "baton.slurm: slurm job" in line and "restarts: " in line]
    return max(counts, default=0)


def cancel_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="baton cancel", description="cancel a run submitted with baton submit")
    p.add_argument("run_dir")
    args = p.parse_args(argv)
    record = read_record(args.run_dir)
    for job in jobs_of(record):
        job.cancel(check=False)
    ids = ", ".join(record["job_ids"])
    print(f"cancel requested for job {ids}; `baton status {args.run_dir}` shows when it has ended")
    return 0


def _tail(path: Path, lines: int) -> tuple[list[str], int]:
    if not path.is_file():
        return [], 0
    data = path.read_bytes()
    return data.decode(errors="replace").splitlines()[-lines:] if lines else [], len(data)


def logs_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="baton logs", description="the output of a run submitted with baton submit")
    p.add_argument("run_dir")
    p.add_argument("-n", "--lines", type=int, default=40, help="last lines to print (default 40)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    p.add_argument("--task", type=int, default=0, help="task (rank) whose log to show (default 0)")
    p.add_argument("--array", type=int, default=0, help="array element of a shards job (default 0)")
    p.add_argument("--stderr", action="store_true", help="the task's stderr (log lines, errors) instead of stdout")
    args = p.parse_args(argv)
    record = read_record(args.run_dir)
    if args.array >= len(record["job_ids"]):
        raise BatonError(f"--array {args.array}: the job has {len(record['job_ids'])} element(s)")
    if args.task >= record.get("tasks", 1):
        raise BatonError(f"--task {args.task}: the job has {record.get('tasks', 1)} task(s)")
    import submitit

    job = submitit.SlurmJob(folder=record["log_folder"], job_id=record["job_ids"][args.array], tasks=[args.task]) \
        if record["executor"] == "slurm" else None
    paths = job.paths if job else submitit.core.utils.JobPaths(record["log_folder"], record["job_ids"][args.array],
                                                                 args.task)
    path = paths.stderr if args.stderr else paths.stdout
    shown, offset = _tail(path, args.lines)
    print(f"==> {path} <==")
    for line in shown:
        print(line)
    while args.follow and job is not None:
        done = outcome(job).done
        if path.is_file() and path.stat().st_size > offset:
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
        if done:
            break
        time.sleep(1.0)
    return 0
