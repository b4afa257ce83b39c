"""Steps whose loss is not finite: stopped at once, or skipped a bounded number of times.

Both training stages (pretraining's engine for every method and strategy, finetuning's loop)
check the loss of each step before its update. `train.max_nonfinite_steps` (default 0) is how many
such steps a run may skip: a skipped step applies nothing (no optimiser step, its gradients
dropped, the module's buffers, e.g. BatchNorm statistics or DINO's centre, put back as they were
before its forward), but it still counts as a step, so the schedule and the data order go on as
in a run that had only left that batch out. One step more than the limit stops the run, naming
every non-finite step and the last good checkpoint. The steps skipped so far are saved in the
checkpoint (`nonfinite_steps`), so the bound holds for the whole run, across resumes.

Why bounded: a rare bad batch (an overflow on one odd sample) should not end a week-long run,
but a run that keeps producing non-finite losses is diverging, and training on would only
write checkpoints of garbage over the good ones.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from baton.distributed import all_reduce
from baton.errors import BatonError

KEY = "train.max_nonfinite_steps"
log = logging.getLogger("baton")


def nonfinite_ranks(losses: torch.Tensor, rank: int = 0, world_size: int = 1) -> list[int]:
    """The ranks whose loss of this step is not finite, the same list on every rank. One all_reduce
    of each rank's flag decides for all: a rank that decided alone would apply an update (or wait in
    a collective) that the others skip, and the replicas would part or the run would hang."""
    flags = torch.zeros(world_size, device=losses.device)
    flags[rank] = (~torch.isfinite(losses)).any().float()
    return [r for r, bad in enumerate(all_reduce(flags, "sum").tolist()) if bad]


def describe(losses: torch.Tensor, bad: list[int], rank: int = 0, world_size: int = 1) -> str:
    """Where the loss was not finite, for the message every rank prints."""
    if world_size == 1:
        return str(losses.tolist())
    where = f"on rank{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} of {world_size}"
    return where + (f"; here, rank {rank}: {losses.tolist()}" if rank in bad else "")


class NonFiniteSteps:
    """The skipped steps of a run and the limit on them (`train.max_nonfinite_steps`)."""

    def __init__(self, limit: int, skipped: Iterable[int] = ()):
        self.limit = int(limit)
        self.steps: list[int] = [int(s) for s in skipped]
        self._buffers: list[tuple[torch.Tensor, torch.Tensor]] = []

    def snapshot(self, *modules: Optional[nn.Module]) -> None:
        """Before a step's forward: copy the modules' buffers, which a forward may change in place
        (BatchNorm running statistics, DINO's centre), so a skipped step can put them back. Nothing
        is copied when no step may be skipped."""
        if self.limit <= 0:
            return
        self._buffers = [(b, b.detach().clone()) for m in modules if m is not None for b in m.buffers()]

    @torch.no_grad()
    def restore(self) -> None:
        for live, saved in self._buffers:
            live.copy_(saved)
        self._buffers = []

    def skip(self, step: int, detail: str, last_good: Callable[[], Optional[Path]], advice: str) -> None:
        """Record the non-finite `step` (1-based); raise `BatonError` once more steps are non-finite
        than the limit allows, naming them and the last good checkpoint. Otherwise put the buffers
        back: the caller then drops the step's gradients instead of stepping."""
        self.steps.append(int(step))
        if len(self.steps) > self.limit:
            earlier = self.steps[:-1]
            seen = (f"; the non-finite steps of this run: {', '.join(map(str, self.steps))}, more than "
                    f"{KEY}={self.limit}") if earlier else ""
            raise BatonError(f"the loss is not finite at step {step} ({detail}){seen}; nothing of this step was "
                             f"applied or saved. The last good checkpoint is {last_good() or 'none yet'}: {advice}, "
                             f"and continue with resume=latest" +
                             ("" if earlier or self.limit else f" (or let {KEY} skip a few such steps)"))
        self.restore()
        log.warning("the loss is not finite at step %d (%s): step skipped, nothing applied (%d of %s=%d)",
                    step, detail, len(self.steps), KEY, self.limit)
