"""DDP: the module replicated on every rank, gradients all-reduced in backward.

One process without a group is the same strategy with no wrapper. Precision: bf16 or fp16
autocast around the forward; fp16 (CUDA only) also scales the loss with `torch.amp.GradScaler`,
whose state goes into the checkpoint. Gradient accumulation skips the all-reduce of all but the
last micro-batch (`no_sync`). The checkpoint is one `state.pt`: full model and optimiser state
dicts keyed by parameter names, which FSDP2 loads too (pretrain/strategies/base.py).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import ContextManager

import torch
from torch import nn

from baton.run import autocast_context
from pretrain.strategies.base import ParamGroups, Strategy, full_state


class DDPStrategy(Strategy):
    name = "ddp"
    channels_last_ok = True

    def setup(self, model: nn.Module, param_groups: ParamGroups):
        self.model = model.to(self.info.device)
        if self.cfg.train.compile:
            self.model.compile()
        net = self.model
        if self.info.distributed:
            cuda = self.info.device.type == "cuda"
            net = nn.parallel.DistributedDataParallel(self.model, device_ids=[self.info.local_rank] if cuda else None)
        self.net = net
        self.optimizer = self.make_optimizer(param_groups(self.model))
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        return net, self.optimizer

    def autocast(self) -> ContextManager:
        return autocast_context(self.precision, self.info.device)

    def accumulating(self, last: bool) -> ContextManager:
        return self.net.no_sync() if self.info.distributed and not last else nullcontext()

    def no_grad_net(self) -> nn.Module:
        # The unwrapped module: DDP's own forward would broadcast rank 0's buffers and mark the next
        # forward as not needing it, so the step's first forward with gradients would skip the broadcast.
        return self.model

    def backward(self, loss: torch.Tensor, accum: int, last: bool) -> None:
        loss = loss / accum
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def save(self, step_dir: Path) -> dict:
        if not self.info.is_main:   # replicated: rank 0's copy is the checkpoint
            return {}
        model_state, optim_state = full_state(self.model, self.optimizer)
        extra = {"model": model_state, "optimizer": optim_state}
        if self.scaler is not None:
            extra["scaler"] = self.scaler.state_dict()
        return extra   # rank 0 writes them into state.pt

    @staticmethod
    def read_full_model_state(step_dir: Path, state: dict) -> dict[str, torch.Tensor]:
        return state["model"]
