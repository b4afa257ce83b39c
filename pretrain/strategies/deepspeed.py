"""DeepSpeed ZeRO (`train.zero_stage` 1: optimiser state sharded, 2: + gradients, 3: + parameters).

The optimiser is a client `torch.optim.AdamW` over the method's groups (no FusedAdam/CPUAdam JIT
builds; with `train.offload` ZeRO runs it on the CPU copies, `zero_force_ds_cpu_optimizer: false`).
baton derives DeepSpeed's batch, clipping, precision and ZeRO keys from its own config;
`train.deepspeed` adds or overrides entries. `check_config` validates the result with DeepSpeed's
own config classes (pydantic sections reject unknown keys; a top-level key DeepSpeed never reads is
reported too) and checks train_batch_size = micro-batch x accumulation x world size, all before any
process group starts. The learning rate stays baton's (set on the groups each step): a DeepSpeed
`optimizer` or `scheduler` section is refused.

On CPU the process group is gloo and DeepSpeed's shared-memory all-reduce op is switched off
(`baton.compat.disable_deepspeed_op`), so no C++ op is JIT-built (that build costs 40-80 s).
In bf16/fp16 DeepSpeed keeps the module in that dtype (fp32 master weights in the optimiser), so
`prepare` casts floating inputs to it. After each step `method.after_step` sees the module; under
ZeRO-3 its parameters are gathered for that (modifications on rank 0 are kept). A change to a
*trained* parameter there does not reach the fp32 master copy, which the next step writes back.

DeepSpeed's engine cannot broadcast 0-dim parameters (CLIP's logit_scale: `view(torch.uint8)` fails
on a 0-dim tensor), so `setup` turns them into 1-element vectors (broadcasting keeps the maths the
same); `state.pt` lists them and `read_full_model_state` gives them back their 0-dim shape.

Checkpoints: DeepSpeed's `save_checkpoint` files under `deepspeed/` in the step directory (every
rank writes its partitions); `load_checkpoint` and `zero_to_fp32` (used by `baton export`) read
them with `torch.load(weights_only=False)`: DeepSpeed offers no restricted loading.
"""

from __future__ import annotations

import copy
import json
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from baton.compat import disable_deepspeed_op
from baton.errors import BatonError
from baton.run import choose_device, resolve_precision
from pretrain.strategies.base import ParamGroups, Strategy, ensure_process_group

TAG = "deepspeed"   # DeepSpeed's checkpoint tag: its files go to STEP_DIR/deepspeed/


def _device_type(cfg) -> str:
    """The device the run will take (`baton.run.choose_device`), before any process group is up."""
    return choose_device(cfg.train.device).type


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _user_entries(cfg) -> dict:
    extra = cfg.train.deepspeed
    if extra is None:
        return {}
    if isinstance(extra, str):
        path = Path(extra)
        if not path.is_file():
            raise BatonError(f"train.deepspeed={extra!r}: no such file (give a JSON file or a mapping of DeepSpeed keys)")
        try:
            extra = json.loads(path.read_text())
        except ValueError as e:
            raise BatonError(f"train.deepspeed={extra!r}: not valid JSON: {e}") from None
    if not isinstance(extra, dict):
        raise BatonError(f"train.deepspeed must be a mapping of DeepSpeed config keys, not {extra!r}")
    for owned in ("optimizer", "scheduler"):
        if owned in extra:
            raise BatonError(f"train.deepspeed.{owned}: baton builds the optimiser (AdamW, optim.*) and the "
                             f"learning-rate schedule itself; remove the key and set optim.* instead")
    return extra


def deepspeed_config(cfg, world_size: int) -> dict:
    """The DeepSpeed config of this run: baton's keys, then `train.deepspeed`'s entries merged over them."""
    t = cfg.train
    precision = resolve_precision(t.precision, torch.device(_device_type(cfg)))
    if t.zero_stage not in (1, 2, 3):
        raise BatonError(f"train.zero_stage must be 1, 2 or 3, not {t.zero_stage}")
    zero: dict = {"stage": t.zero_stage}
    if t.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": _device_type(cfg) == "cuda"}
        if t.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": _device_type(cfg) == "cuda"}
    base = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": cfg.data.batch_size * t.grad_accum * world_size,
        "gradient_clipping": float(cfg.optim.grad_clip or 0.0),
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    return _merge(base, _user_entries(cfg))


class _ReadTrackingDict(dict):
    """A dict that records which keys were read (to find the top-level keys DeepSpeed ignores)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read: set = set()

    def __getitem__(self, k):
        self.read.add(k)
        return super().__getitem__(k)

    def get(self, k, default=None):
        self.read.add(k)
        return super().get(k, default)

    def __contains__(self, k):
        self.read.add(k)
        return super().__contains__(k)


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"

    @classmethod
    def check_config(cls, cfg, world_size: int) -> None:
        ds = deepspeed_config(cfg, world_size)
        want = {"train_micro_batch_size_per_gpu": cfg.data.batch_size, "gradient_accumulation_steps": cfg.train.grad_accum,
                "train_batch_size": cfg.data.batch_size * cfg.train.grad_accum * world_size}
        wrong = {k: ds.get(k) for k, v in want.items() if ds.get(k) != v}
        if wrong:
            raise BatonError(
                f"train.deepspeed: {', '.join(f'{k}={v}' for k, v in wrong.items())} does not match this run: "
                f"train_batch_size must equal train_micro_batch_size_per_gpu x gradient_accumulation_steps x "
                f"world size = data.batch_size ({cfg.data.batch_size}) x train.grad_accum ({cfg.train.grad_accum}) "
                f"x {world_size} = {want['train_batch_size']}; leave these keys out (baton derives them) and set "
                f"data.batch_size / train.grad_accum instead")
        import torch.distributed as dist
        from deepspeed.runtime.config import DeepSpeedConfig

        # DeepSpeedConfig checks the batch keys against the running group's size (1 without one): checked above.
        seen_world = dist.get_world_size() if dist.is_initialized() else 1
        single = _ReadTrackingDict({**ds, "train_batch_size": want["train_batch_size"] // world_size * seen_world})
        try:
            DeepSpeedConfig(single)
        except Exception as e:  # pydantic ValidationError, AssertionError, ValueError
            raise BatonError(f"train.deepspeed: DeepSpeed rejects the config: {type(e).__name__}: {e}") from None
        unknown = sorted(set(single) - single.read)
        if unknown:
            raise BatonError(f"train.deepspeed: unknown DeepSpeed config key(s) {', '.join(unknown)} "
                             f"(DeepSpeed would ignore them; see https://www.deepspeed.ai/docs/config-json/)")

    def setup(self, model: nn.Module, param_groups: ParamGroups):
        import deepspeed

        ensure_process_group(self.info)
        for key, value in (("LOCAL_RANK", self.info.local_rank), ("RANK", self.info.rank),
                           ("WORLD_SIZE", self.info.world_size)):
            os.environ.setdefault(key, str(value))   # DeepSpeed reads them even for one plain process
        if self.info.device.type == "cpu":
            disable_deepspeed_op("deepspeed_shm_comm")   # gloo all-reduce; no JIT build
        deepspeed.init_distributed(dist_backend="nccl" if self.info.device.type == "cuda" else "gloo")
        self.ds_config = deepspeed_config(self.cfg, self.info.world_size)
        model = model.to(self.info.device)
        self.scalars = sorted(n for n, p in model.named_parameters() if p.ndim == 0)
        for name in self.scalars:
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner)
            old = getattr(module, attr)
            setattr(module, attr, nn.Parameter(old.detach().reshape(1), requires_grad=old.requires_grad))
        if self.cfg.train.compile:
            model.compile()
        optimizer = self.make_optimizer(param_groups(model))
        engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config,
                                                          dist_init_required=False)
        self.engine, self.model, self.optimizer = engine, engine.module, ds_optimizer
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        return engine, ds_optimizer

    def prepare(self, batch: tuple, on_device: Callable[[tuple], tuple] | None = None) -> tuple:
        batch = super().prepare(batch, on_device)
        if self.dtype is None:
            return batch
        return tuple(t.to(self.dtype) if t.is_floating_point() else t for t in batch)

    def no_grad_net(self) -> nn.Module:
        return self.engine   # its forward gathers ZeRO-3 parameters; under no_grad it prepares no backward

    def backward(self, loss: torch.Tensor, accum: int, last: bool) -> None:
        # loss / accum here rather than DeepSpeed's own division by gradient_accumulation_steps
        # (the same number, checked in check_config), so a caller can pass accum=1 for a loss that
        # is already its micro-batch's share (CLIP's full-batch accumulation)
        self.engine.backward(loss / accum, scale_wrt_gas=False)
        if not last:
            self.engine.step()       # only counts the micro-step (no update before the boundary)

    def step(self, grad_clip: float | None) -> None:
        self.engine.step()           # clips to `gradient_clipping`, steps, zeroes the gradients

    def skip_step(self) -> bool:
        """DeepSpeed's engine owns the gradients (ZeRO partitions them) and its own step counters, so
        the step is ended by DeepSpeed itself: its optimiser refuses to step on gradients that are not
        finite (ZeRO's overflow path drops them and counts the step as skipped), which a non-finite
        loss gives. Should it step all the same (a non-finite loss with finite gradients), the update
        is in the weights: False, and the run stops."""
        self.engine.step()
        return not self.engine.was_step_applied()

    def after_step(self, step: int, total: int) -> None:
        gathered = nullcontext()
        if self.cfg.train.zero_stage == 3:
            import deepspeed
            gathered = deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=0)
        with torch.no_grad(), gathered:
            self.method.after_step(self.model, step, total)

    def save(self, step_dir: Path) -> dict:
        self.engine.save_checkpoint(str(step_dir), tag=TAG, save_latest=False)
        return {"scalar_params": self.scalars}

    def load(self, step_dir: Path, state: dict) -> None:
        if state.get("strategy", "ddp") != self.name:
            raise BatonError(f"{step_dir} was written by train.strategy={state.get('strategy', 'ddp')}: resume it "
                             f"with that strategy (or `baton export` it and start from the weights)")
        path, _ = self.engine.load_checkpoint(str(step_dir), tag=TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise BatonError(f"{step_dir / TAG}: DeepSpeed found no checkpoint to load (incomplete step directory?)")

    @staticmethod
    def read_full_model_state(step_dir: Path, state: dict) -> dict[str, torch.Tensor]:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        full = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=TAG)
        for name in state.get("scalar_params", []):
            full[name] = full[name].reshape(())
        return full
