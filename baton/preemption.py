"""Stop requests: how a launcher (Slurm preemption, a time limit, Ctrl-C) asks a training loop to
write a checkpoint at the next step boundary and return, instead of being killed mid-step.

A signal handler may only set a flag: the checkpoint itself is collective (every rank's loader
position is gathered, sharded strategies save together), so it must happen in the loop, on every
rank, at the same step. `stop_requested()` therefore takes the max of the flag over ranks (one
tiny all-reduce per call), and the loops call it once per step.

    install_stop_signals(signal.SIGUSR2)      # the launcher, before training
    ...
    if stop_requested():                       # the loop, after each optimiser step
        checkpoint(); return EXIT_STOPPED
"""

from __future__ import annotations

import signal
from typing import Iterable

import torch
import torch.distributed as dist

from baton.distributed import all_reduce

# Exit status of a stage that stopped on request after writing a checkpoint: resume=latest continues.
EXIT_STOPPED = 3

_requested = False


def request_stop(*_args) -> None:
    """Ask the running loop to checkpoint and return (usable directly as a signal handler)."""
    global _requested
    _requested = True


def clear_stop() -> None:
    global _requested
    _requested = False


def install_stop_signals(signals: Iterable[int] = (signal.SIGUSR2,)) -> None:
    """Route the given signals to `request_stop` (main thread only, as Python requires)."""
    for sig in signals:
        signal.signal(sig, request_stop)


def stop_requested() -> bool:
    """True on every rank if any rank was asked to stop (an all-reduce when a group is running)."""
    if not (dist.is_available() and dist.is_initialized()):
        return _requested
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    flag = torch.tensor([1 if _requested else 0], dtype=torch.int32, device=device)
    return bool(all_reduce(flag, "max").item())
