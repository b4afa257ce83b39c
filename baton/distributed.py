"""Distributed initialisation shared by every stage.

Reads the torchrun / Slurm-mapped environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT); a plain `python` run is a world of one with no process group. gloo on CPU, nccl on GPU.

Every collective has a time limit, `BATON_COLLECTIVE_TIMEOUT_S` seconds (default 1800): a rank that
died or was stopped makes the others fail with an error naming this rank and the collective, instead
of waiting without a word. torch's own limit applies to the collectives inside DDP/FSDP too, and
`peer_failures` turns their failure (a peer's socket closed by a kill -9, or the limit reached) into
the same error, naming the lost peer, where a training loop runs them.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from baton.errors import BatonError
from baton.io import seconds_from_env
from baton.registry import unknown_name

TIMEOUT_ENV = "BATON_COLLECTIVE_TIMEOUT_S"
DEVICES = ("auto", "cpu", "cuda")


def collective_timeout_s() -> float:
    return seconds_from_env(TIMEOUT_ENV, 1800.0)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def choose_device(name: str, local_rank: int | None = None) -> torch.device:
    """`train.device`: auto (cuda when available, else cpu) | cpu | cuda (this rank's GPU when
    `local_rank` is given). It lives here, below `baton.run` (which exports it to the loops), so that
    `baton.preemption`, which `baton.run` imports, can use this module's all-reduce without a cycle."""
    if name not in DEVICES:
        raise unknown_name("train.device", name, DEVICES)
    use_cuda = torch.cuda.is_available() if name == "auto" else name == "cuda"
    if not use_cuda:
        return torch.device("cpu")
    return torch.device("cuda") if local_rank is None else torch.device("cuda", local_rank)


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise torch.distributed from the environment if WORLD_SIZE > 1.

    `device`: "auto" (cuda when available, else cpu), "cpu" or "cuda".
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = choose_device(device, local_rank)
    use_cuda = dev.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=collective_timeout_s()))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


# What a collective's failure says when the fault is a peer's (gloo's and NCCL's transport
# errors come as plain RuntimeErrors, not always as torch's DistError)
_PEER_FAULT = re.compile(r"gloo|nccl|c10d|ProcessGroup|connection (closed|reset) by peer|broken pipe|timed out",
                         re.IGNORECASE)
_ADDRESS = re.compile(r"\[([0-9a-fA-F.:]+)\]:(\d+)")


def peer_fault(e: BaseException) -> bool:
    """Whether `e`, raised in a multi-process run, is a collective that failed because of a peer."""
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and bool(_PEER_FAULT.search(str(e))))


def _peer_error(what: str, e: BaseException) -> BatonError:
    rank, world = dist.get_rank(), dist.get_world_size()
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    first = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\] ", "", first)[:200]   # gloo's source position
    at = _ADDRESS.search(str(e))
    who = f"rank {1 - rank}" if world == 2 else "another rank"
    who += f" (the peer at {at.group(1)}:{at.group(2)})" if at else ""
    return BatonError(f"rank {rank} of {world}: {what} failed ({first}); {who} died, was stopped or is stuck (see "
                      f"its log). The limit is {TIMEOUT_ENV}={collective_timeout_s():.0f} s; continue with "
                      f"resume=latest once every rank runs")


@contextmanager
def peer_failures(what: str | Callable[[], str], only_peer_faults: bool = True) -> Iterator[None]:
    """A collective inside that fails because a peer died, was stopped or hangs, as one BatonError
    naming this rank and the peer, instead of a traceback from deep inside torch. It covers the
    collectives baton calls (below) and those torch runs itself: DDP's gradient all-reduce, FSDP's
    gathers, open_clip's feature all_gather. Other errors pass unchanged (`only_peer_faults`: around
    one of baton's own collectives, any failure is the collective's). `what` may be a function, read
    when it fails (a training loop's current step)."""
    try:
        yield
    except RuntimeError as e:
        if isinstance(e, BatonError) or not (dist.is_available() and dist.is_initialized()):
            raise
        if only_peer_faults and not peer_fault(e):
            raise
        raise _peer_error(what() if callable(what) else what, e) from None


def _named(what: str):
    return peer_failures(what, only_peer_faults=False)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        with _named("a barrier"):
            dist.barrier()


def destroy() -> None:
    """End the process group (and DeepSpeed's groups cloned from it: `baton.compat`), so that a later
    run in the same process starts clean."""
    from baton.compat import destroy_process_group

    destroy_process_group()


# the reductions a caller may name; "mean" is a sum divided by the world size because gloo has no
# AVG (NCCL's ReduceOp.AVG would make the result depend on the backend)
REDUCE_OPS = ("sum", "mean", "max", "min")


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """`t` reduced over ranks by `op` (sum | mean | max | min), in place, and returned.

    The one all-reduce of the project, so every caller gets the peer-failure error and the same
    world-of-one rule: without a process group, or in a group of one, `t` is returned unchanged
    (no collective is run, a mean of one is the value itself)."""
    if op not in REDUCE_OPS:
        raise ValueError(f"all_reduce op {op!r}: expected one of {', '.join(REDUCE_OPS)}")
    if op == "mean" and not (t.is_floating_point() or t.is_complex()):
        raise TypeError(f"all_reduce op 'mean' of a {t.dtype} tensor: the mean of integers is not an integer; "
                        "reduce a floating-point tensor (or use op='sum' and divide)")
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    reduce_op = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM,
                 "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    with _named(f"an all_reduce ({op})"):
        dist.all_reduce(t, op=reduce_op)
    if op == "mean":
        t.div_(dist.get_world_size())
    return t


def all_gather_object(obj) -> list:
    """Every rank's picklable `obj`, in rank order, on every rank ([obj] without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    with _named("an all_gather"):
        dist.all_gather_object(out, obj)
    return out
