"""Training strategies: how the method's module is spread over ranks (`train.strategy`).

    ddp        replicated module, all-reduced gradients; checkpoint: one state.pt      (ddp.py)
    fsdp       FSDP2 fully_shard, bf16 MixedPrecisionPolicy; checkpoint: DCP shards     (fsdp.py)
    deepspeed  ZeRO stage 1/2/3, optional CPU offload; checkpoint: DeepSpeed's format  (deepspeed.py)

Each is one file implementing `pretrain.strategies.base.Strategy`; they are imported only when
chosen. Every checkpoint also has a small `state.pt` (step, RNG, loader position, config,
`strategy`) that says which one wrote it, so `full_model_state` can read any of them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from baton.registry import Registry
from pretrain.strategies.base import Strategy

STRATEGIES = Registry("train.strategy", {
    "ddp": "pretrain.strategies.ddp:DDPStrategy",
    "fsdp": "pretrain.strategies.fsdp:FSDPStrategy",
    "deepspeed": "pretrain.strategies.deepspeed:DeepSpeedStrategy",
})


def strategy_class(name: str) -> type[Strategy]:
    """The strategy class `train.strategy` names (its module imported now), or a BatonError listing them."""
    return STRATEGIES[name]


def full_model_state(step_dir: str | Path, state: dict) -> dict[str, torch.Tensor]:
    """The full model state dict of the checkpoint in `step_dir` (whose state.pt is `state`), whichever
    strategy wrote it; one process, no process group (what `baton export` uses)."""
    return strategy_class(state.get("strategy", "ddp")).read_full_model_state(Path(step_dir), state)


__all__ = ["STRATEGIES", "Strategy", "strategy_class", "full_model_state"]
