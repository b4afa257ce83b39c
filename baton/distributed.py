"""Distributed initialisation shared by every stage.

Reads the torchrun / Slurm-mapped environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT); a plain `python` run is a world of one with no process group. gloo on CPU, nccl on GPU.

Every collective has a time limit, `BATON_COLLECTIVE_TIMEOUT_S` seconds (default 1800): a rank that
died or was stopped makes the others fail with an error naming this rank and the collective, instead
of waiting without a word. (torch's own limit applies to the collectives inside DDP/FSDP too.)
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

from baton.errors import BatonError
from baton.io import seconds_from_env
from baton.run import choose_device

TIMEOUT_ENV = "BATON_COLLECTIVE_TIMEOUT_S"


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


@contextmanager
def _named(what: str) -> Iterator[None]:
    """A failed collective (a peer timed out, died or was stopped) as an error naming this rank."""
    try:
        yield
    except (RuntimeError, dist.DistError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise BatonError(f"rank {dist.get_rank()} of {dist.get_world_size()}: {what} failed ({first}); another "
                         f"rank died, was stopped or is stuck (see its log). The limit is {TIMEOUT_ENV}="
                         f"{collective_timeout_s():.0f} s; continue with resume=latest once every rank runs") from None


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        with _named("a barrier"):
            dist.barrier()


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over ranks, in place (unchanged without a process group)."""
    if dist.is_available() and dist.is_initialized():
        with _named("an all_reduce"):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_object(obj) -> list:
    """Every rank's picklable `obj`, in rank order, on every rank ([obj] without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    with _named("an all_gather"):
        dist.all_gather_object(out, obj)
    return out
