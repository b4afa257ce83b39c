"""What is learned, apart from how it is trained: the pretraining-method contract.

The engine (`pretrain/train.py`) and the strategies (`pretrain/strategies/`) know nothing about
CLIP or DINO; a *method* object does. It builds the one module that is trained and checkpointed,
turns raw shard samples into tensors, computes the loss through the strategy-wrapped module,
does whatever must follow an optimiser step (a clamp, an EMA teacher update) and writes the
handoff from a checkpoint's full state dict. The config key `method` picks one from
`pretrain.methods.METHODS`, which also names each method's config section (`cfg.method_section`).

Per step the loop calls: adjust_optimizer -> accumulate (the step's `train.grad_accum` micro-batches:
by default `loss` per micro-batch, backward through the strategy) -> clip -> optimiser step ->
after_step -> (maybe) evaluate / checkpoint / stop check.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, TypeVar

import torch
from torch import nn

from baton.distributed import DistInfo
from baton.errors import BatonError
from pretrain.data.uint8_images import BatchNormalize, hands_over_uint8

if TYPE_CHECKING:
    from pretrain.config import PretrainConfig
    from pretrain.data import SampleMap
    from pretrain.strategies import Strategy

S = TypeVar("S")

class PretrainMethod:
    """Base class: the defaults are "nothing to do"; a method overrides what it needs."""

    name = "base"
    decodes_on_device = False   # whether the method implements data.decode_on_device (from_loader)

    def __init__(self, cfg: "PretrainConfig", info: DistInfo):
        self.cfg, self.info = cfg, info
        # Set by `baton export` before `export` is called: {"checkpoint": path, "step": n}; a method
        # puts it (with its name) under the handoff's `source` key.
        self.source: dict = {}
        # Set by place_normalization when the workers hand images over as uint8
        # (pretrain.data.uint8_images): `on_device` turns them into normalised floats.
        self.batch_normalize: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        # Optimiser steps per epoch: set by the engine (`pretrain.data.run_steps_per_epoch`) before training.
        self.epoch_steps: Optional[int] = None

    def steps_per_epoch(self) -> int:
        """The engine's optimiser steps per epoch (what `step // steps_per_epoch` epochs count in);
        a method built outside the engine (tools, tests) computes it the same way, once."""
        if self.epoch_steps is None:
            from pretrain.data import run_steps_per_epoch

            self.epoch_steps = run_steps_per_epoch(self.cfg, self.info.world_size)[1]
        return self.epoch_steps

    def build_model(self) -> nn.Module:
        """ONE module holding everything that is trained or checkpointed. Parameters with
        requires_grad=False (e.g. an EMA teacher) are not optimised. A strategy wraps this module."""
        raise NotImplementedError

    def sample_map(self, model: nn.Module) -> "SampleMap":
        """(raw webdataset sample, per-sample seed) -> tuple of tensors; the loader stacks each position
        into a batch and yields (*tensors, keys). Raise `pretrain.data.Rejected` to skip and count a sample."""
        raise NotImplementedError

    def place_normalization(self, normalize: Optional[BatchNormalize]) -> Optional[BatchNormalize]:
        """Where a sample map's uint8 images are normalised (`data.image_handoff`): on the device
        (kept as `batch_normalize` for on_device; None returned) or, on a CPU run, by the loader's
        workers in each batch row (returned: the sample map's `row_normalize`)."""
        if hands_over_uint8(self.cfg.data.image_handoff, self.info.device):
            self.batch_normalize = normalize
            return None
        self.batch_normalize = None
        return normalize

    def from_loader(self, batch: tuple, keys: list[str]) -> tuple:
        """The loader's batch, before it moves to the device (`keys`: its samples' keys, for errors).
        CLIP with data.decode_on_device decodes its JPEG bytes here, on the device. Default: as it is."""
        return batch

    def on_device(self, batch: tuple) -> tuple:
        """The loader's batch just moved to the device, before the strategy casts its dtype: images
        the workers handed over as uint8 become normalised float32 (tokens and other tensors pass)."""
        if self.batch_normalize is None:
            return batch
        return tuple(self.batch_normalize(t) if t.dtype == torch.uint8 else t for t in batch)

    def param_groups(self, model: nn.Module) -> list[dict]:
        """Optimiser groups ({"params": [...], "weight_decay": wd, optional "name"}); the engine builds
        AdamW and sets each group's lr = optim.lr x schedule every step. Default: one group, decay all."""
        return [{"params": [p for p in model.parameters() if p.requires_grad],
                 "weight_decay": self.cfg.optim.weight_decay}]

    def decay_groups(self, model: nn.Module, no_decay: tuple[str, ...]) -> list[dict]:
        """Two groups, open_clip_train's rule: no weight decay on tensors of fewer than 2 dims nor on
        parameters whose name holds one of `no_decay` (gains, biases, embeddings, temperatures)."""
        def exempt(name: str, p: torch.Tensor) -> bool:
            return p.ndim < 2 or any(t in name for t in no_decay)

        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return [{"params": [p for n, p in params if not exempt(n, p)], "weight_decay": self.cfg.optim.weight_decay,
                 "name": "decay"},
                {"params": [p for n, p in params if exempt(n, p)], "weight_decay": 0.0, "name": "no_decay"}]

    def adjust_optimizer(self, optimizer: torch.optim.Optimizer, step: int, total: int) -> None:
        """Per-group overrides, called every step after the engine set the learning rates."""

    def loss(self, net: nn.Module, batch: tuple, step: int, total: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward through the WRAPPED module `net` (exactly one call per micro-batch); return the
        scalar loss and extra scalars to log. `batch` holds the loader's tensors, on the device. An
        extra may be a float or a detached 0-dim tensor that nothing changes afterwards: a tensor is
        read on the host only on a logged step (train.log_every), not on every step."""
        raise NotImplementedError

    def accumulate(self, net: nn.Module, strategy: "Strategy", micro_batches: Iterable[tuple], step: int,
                   total: int) -> tuple[list[torch.Tensor], dict[str, float]]:
        """Forward and backward of one optimiser step's `train.grad_accum` micro-batches (the
        loader's tensors through `from_loader`, not yet `prepare`d); return the step's losses (detached,
        for logging and the finite check) and the extras of `loss`. The gradients left in the module
        are the step's.

        Default, plain gradient accumulation, right for a loss that is a mean over samples (DINO,
        GLIP): each micro-batch's `loss`, its gradient divided by the count; the strategy syncs
        only the last one (`accumulating`). A method whose loss couples the samples of a batch
        overrides this (CLIP: the contrastive loss over the whole accumulated batch)."""
        accum = self.cfg.train.grad_accum
        losses: list[torch.Tensor] = []
        extras: dict[str, float] = {}
        for micro, tensors in enumerate(micro_batches):
            last = micro == accum - 1
            with strategy.accumulating(last):
                with strategy.autocast():
                    loss, extras = self.loss(net, strategy.prepare(tensors, self.on_device), step, total)
                strategy.backward(loss, accum, last)
            losses.append(loss.detach().float())
        return losses, extras

    def after_step(self, model: nn.Module, step: int, total: int) -> None:
        """After optimizer.step(), under torch.no_grad(), on the unwrapped module (FSDP2: DTensor
        parameters; elementwise in-place ops between same-sharded parameters work shard-locally)."""

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        """FSDP2: submodules to `fully_shard` one by one before the root (transformer blocks)."""
        return []

    def export(self, state: dict[str, torch.Tensor], out: Path) -> Path:
        """Write the handoff (`baton.handoff.write_handoff`) from a checkpoint's FULL model state dict."""
        raise NotImplementedError

    def model_label(self) -> str:
        """What the checkpoint's meta records as its `model` (an architecture name)."""
        return self.name

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        """Monitoring every `train.eval_every` steps, on every rank (may use collectives)."""
        return {}


def method_section(cfg: Any, key: str, section: type[S]) -> S:
    """`cfg.<key>`, a method's own config section, as its dataclass `section`: the loaded dataclass
    itself, a plain mapping (tools that build a config by hand) read into it, defaults if absent."""
    value = getattr(cfg, key, None)
    if value is None:
        return section()
    if isinstance(value, section):
        return value
    try:
        return section(**dict(value))
    except TypeError as e:
        raise BatonError(f"config key '{key}': {e}; valid keys: {', '.join(section.__dataclass_fields__)}") from None


def method_class(name: str) -> type[PretrainMethod]:
    """The class of method `name` (`pretrain.methods.METHODS`), or a BatonError listing the known ones."""
    from baton.registry import resolve
    from pretrain.methods import METHODS

    return resolve(METHODS[name].method)


def build_method(cfg: "PretrainConfig", info: DistInfo) -> PretrainMethod:
    """The method named by `cfg.method`, or a `BatonError` listing the known ones."""
    return method_class(cfg.method)(cfg, info)
