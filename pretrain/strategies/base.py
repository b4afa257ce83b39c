"""The interface every strategy implements, and the state-dict plumbing DDP and FSDP2 share.

A strategy owns how the method's one module is spread over ranks: it wraps the module and builds
the optimiser (`setup`), runs forward under the right precision (`autocast`, `prepare`),
accumulates gradients (`accumulating`, `backward`; `no_grad_net` for a forward outside them), clips and steps (`step`), and writes and
reads its checkpoint files inside a step directory (`save`, `load`, `read_full_model_state`).

Model and optimiser state go through `torch.distributed.checkpoint.state_dict` (get/set_state_dict):
parameter names (FQNs) as keys and the same layout whether the module is replicated (DDP) or
sharded (FSDP2), so a checkpoint of either loads into the other: a full state dict (DDP's
`state.pt`) is scattered into shards, a DCP checkpoint is resharded into whatever asks for it.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Callable, ContextManager

import torch
import torch.distributed as dist
from torch import nn

from baton.distributed import DistInfo
from baton.errors import BatonError
from baton.run import fused_adam_kwargs, optimizer_step, resolve_precision, to_channels_last

ParamGroups = Callable[[nn.Module], list[dict]]
DCP_DIR = "dcp"   # FSDP2's torch.distributed.checkpoint files inside a step directory


def ensure_process_group(info: DistInfo) -> None:
    """Sharded strategies need a process group even for one process: a world of one over a HashStore."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if info.device.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)


class Strategy:
    name = "base"
    # whether train.channels_last can be used: FSDP2 and DeepSpeed flatten or byte-view each
    # parameter and refuse NHWC strides
    channels_last_ok = False

    def __init__(self, cfg, info: DistInfo, method):
        self.cfg, self.info, self.method = cfg, info, method
        self.precision = resolve_precision(cfg.train.precision, info.device)
        self.model: nn.Module | None = None          # the unwrapped module (FSDP2: sharded in place)
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler: torch.amp.GradScaler | None = None   # fp16's loss scaler, where a strategy keeps one

    @classmethod
    def check_config(cls, cfg, world_size: int) -> None:
        """Errors in the config that need no process group (called before any starts)."""

    # ------------------------------------------------------------------ training
    def setup(self, model: nn.Module, param_groups: ParamGroups) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Wrap `model` (on the CPU) and build AdamW over `param_groups(wrapped model)`; return (net, optimizer)."""
        raise NotImplementedError

    def make_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        o = self.cfg.optim
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, **fused_adam_kwargs(groups))

    def autocast(self) -> ContextManager:
        return nullcontext()

    def prepare(self, batch: tuple, on_device: Callable[[tuple], tuple] | None = None) -> tuple:
        """The loader's tensors on the device, through `on_device` (the method's: uint8 images
        normalised), then in the dtype the wrapped module takes."""
        batch = tuple(t.to(self.info.device, non_blocking=True) for t in batch)
        batch = on_device(batch) if on_device is not None else batch
        return tuple(map(to_channels_last, batch)) if self.cfg.train.channels_last else batch

    def accumulating(self, last: bool) -> ContextManager:
        """Context of one micro-batch's forward+backward; `last` is the one before the optimiser step."""
        return nullcontext()

    def backward(self, loss: torch.Tensor, accum: int, last: bool) -> None:
        """Backward of `loss / accum` (a micro-batch's share of the step), gradients accumulated."""
        (loss / accum).backward()

    def no_grad_net(self) -> nn.Module:
        """The module to call for an extra forward under torch.no_grad() inside a step (CLIP's feature
        pass of full-batch accumulation): nothing is prepared for a backward or synced for it.
        Default: the module itself (FSDP2 shards it in place, so this is its sharded forward)."""
        return self.model

    def step(self, grad_clip: float | None) -> None:
        optimizer_step(self.optimizer, self.model.parameters(), grad_clip, self.scaler)
        self.optimizer.zero_grad(set_to_none=True)

    def skip_step(self) -> bool:
        """End a step without an update (its loss was not finite on some rank, baton/nonfinite.py):
        drop the accumulated gradients, on every rank alike. False if the update could not be held
        back (it is then in the weights, and the run must stop)."""
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def after_step(self, step: int, total: int) -> None:
        with torch.no_grad():
            self.method.after_step(self.model, step, total)

    # ------------------------------------------------------------------ checkpoints
    def save(self, step_dir: Path) -> dict:
        """Write this rank's files into `step_dir` (collective); return entries for rank 0's state.pt."""
        raise NotImplementedError

    def load(self, step_dir: Path, state: dict) -> None:
        """Restore model and optimiser from a checkpoint of a DDP (`state.pt`) or FSDP2 (DCP) run."""
        saved = state.get("strategy", "ddp")
        if saved == "deepspeed":
            raise BatonError(f"{step_dir} was written by train.strategy=deepspeed: resume it with "
                             f"train.strategy=deepspeed (or `baton export` it and start from the weights)")
        if "model" in state:
            load_full_state(self.model, self.optimizer, state["model"], state.get("optimizer"))
        else:
            load_dcp_state(self.model, self.optimizer, step_dir / DCP_DIR)
        if getattr(self, "scaler", None) is not None and state.get("scaler"):  # fp16 loss scaling
            self.scaler.load_state_dict(state["scaler"])

    @staticmethod
    def read_full_model_state(step_dir: Path, state: dict) -> dict[str, torch.Tensor]:
        """The full (unsharded, CPU) model state dict of a checkpoint, in one process without a group."""
        raise NotImplementedError


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimiser) full state dicts on every rank, keyed by parameter names (collective under FSDP2;
    with cpu_offload=True torch would give them to rank 0 only)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict | None) -> None:
    """Load full state dicts (every rank passes the whole dicts) into a replicated or sharded module."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    if optim_state and optim_state.get("param_groups") and \
            isinstance(optim_state["param_groups"][0]["params"][0], int):  # before parameter-name keys
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        return
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state or {},
                   options=StateDictOptions(full_state_dict=True, strict=True))


def load_dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Load a torch.distributed.checkpoint directory into the module, resharding as needed (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (path / ".metadata").is_file():
        raise BatonError(f"{path}: no torch.distributed.checkpoint metadata; the checkpoint is incomplete")
    model_state, optim_state = get_state_dict(model, optimizer)  # the layout to load into
    target = {"model": model_state, "optimizer": optim_state}
    dcp.load(target, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optimizer"])
