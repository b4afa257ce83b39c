"""One run lifecycle for both training loops (`pretrain/train.py`, `finetune/train.py`).

What every baton training run does the same way lives here, once: the run directory's rules
(a fresh run never writes over checkpoints; `resume=latest` continues in place, `resume=PATH`
from that step), the resolved `config.yaml` with a warning per key that changed since the run
started, seeding and the RNG states a checkpoint carries, the device `train.device` names and
the precision `train.precision` names (`resolve_precision`, `autocast_context`), the memory
layout `train.channels_last` names (`to_channels_last`), and when to
checkpoint (every `train.checkpoint_every` steps, 0 = every epoch; at the end; on a stop
request from a launcher, `baton.preemption`), keeping the last `train.keep_last`.

A loop keeps only what differs: what it builds, what a step is, and what its checkpoint holds:

    run = RunLifecycle(cfg.run_dir, cfg.resume, cfg.seed, is_main=info.is_main)
    run.record_config(cfg)                         # after the loop's own config checks
    run.seed()
    ... build; if run.resume_from: load it ...
    cadence = CheckpointCadence(cfg.train.checkpoint_every, steps_per_epoch, total)
    while ...:                                     # one optimiser step
        save, stop = cadence.after_step(step)
        if save: write a checkpoint (keep_last=cfg.train.keep_last)
        if stop: return EXIT_STOPPED
"""

from __future__ import annotations

import logging
import random
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf

from baton.checkpoint import latest_checkpoint, refuse_used_run_dir
from baton.config import to_yaml
from baton.config_upgrade import upgrade_node
from baton.distributed import choose_device  # noqa: F401 (the loops' device: API here)
from baton.errors import BatonError
from baton.io import write_text_atomic
from baton.preemption import stop_requested
from baton.registry import unknown_name

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
log = logging.getLogger("baton")


def use_threads(threads: int | None) -> None:
    """`train.threads`: torch's intra-op threads in this process (None keeps torch's default, one per
    core). Several small runs side by side on a small CPU (the demo's finetunings two at a time on 2
    cores) go faster at 1 each than one after the other at 2, whose small ops barely use the second."""
    if threads:
        torch.set_num_threads(threads)


def resolve_precision(precision: str, device: torch.device) -> str:
    """fp32 | bf16 | fp16 for `train.precision` on `device`. auto: bf16 on a CUDA GPU that has it,
    else fp32 (on a CPU, bf16 pays only where it has bf16 matrix units, e.g. AMX: name it there)."""
    if precision not in PRECISIONS:
        raise unknown_name("train.precision", precision, PRECISIONS)
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise BatonError("train.precision=fp16 needs a CUDA GPU (its loss scaling is CUDA-only); "
                         "use train.precision=bf16 or fp32 on CPU")
    return precision


def autocast_context(precision: str, device: torch.device) -> ContextManager:
    """The forward's autocast for a resolved precision: parameters, gradients and optimiser state
    stay fp32; matmuls and convolutions run in bf16/fp16."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def optimizer_step(optimizer: torch.optim.Optimizer, params, grad_clip: float | None,
                   scaler: "torch.amp.GradScaler | None" = None) -> None:
    """One optimiser step after the backward: gradients clipped to `grad_clip` (unscaled first
    under fp16's `scaler`, so the bound is on the true norm), then the step; under fp16 a step whose
    gradients overflowed is skipped by the scaler, which then lowers its scale."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()


def fused_adam_kwargs(groups: list[dict]) -> dict:
    """`{"fused": True}` for torch's Adam/AdamW where every parameter is a plain floating tensor on
    the CPU or a CUDA GPU, else `{}` (torch's own choice: foreach on CUDA, e.g. for FSDP2's
    DTensors). Why: on a CPU torch otherwise runs its per-tensor Python loop (`_single_tensor_adam`,
    about 8 % of a finetuning step of the demo's convnet in a profile); the fused kernel does the
    same update in one pass per tensor, about 4x faster on the optimiser step alone
    (`benchmarks/adam_cpu.py`, BENCHMARKS.md). Same arithmetic: figures move by rounding only."""
    params = [p for g in groups for p in g["params"]]
    ok = params and all(type(p) in (torch.Tensor, torch.nn.Parameter) and p.is_floating_point()
                        and p.device.type in ("cpu", "cuda") for p in params)
    return {"fused": True} if ok else {}


def to_channels_last(x):
    """A module's 4-D weights or a 4-D batch in channels-last (NHWC) order, the layout oneDNN (CPU)
    and cuDNN (GPU) convolutions run fastest in (about 1.4x a step of the demo's convnet on 2 CPU
    cores, BENCHMARKS.md); anything else unchanged. Values and state-dict names stay the same, and
    the handoff writers store tensors contiguous, so checkpoints and exports do not depend on it."""
    if isinstance(x, torch.nn.Module):
        return x.to(memory_format=torch.channels_last)
    if isinstance(x, torch.Tensor) and x.dim() == 4 and x.is_floating_point():
        return x.contiguous(memory_format=torch.channels_last)
    return x


def resolve_resume(resume: str | None, ckpt_root: str | Path) -> Path | None:
    """The checkpoint a run continues from, by the same rules in every stage: `resume` unset is a
    fresh run and is refused over a run directory that has checkpoints; `latest` is the newest
    intact one there (None when there is none yet: a first start); anything else is that path."""
    if resume is None:
        refuse_used_run_dir(ckpt_root)
        return None
    if resume == "latest":
        path = latest_checkpoint(ckpt_root)
        if path is None:
            log.info("resume=latest: no checkpoint in %s yet, starting from step 0", ckpt_root)
        return path
    return Path(resume)


def rng_state() -> dict:
    """RNG states as tensors and plain lists, so the checkpoint loads with weights_only=True."""
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass(frozen=True)
class CheckpointCadence:
    """When a loop writes a checkpoint: every `every` steps (0: every epoch), at the last step, and
    whenever a launcher asked to stop (then the loop returns)."""
    every: int
    steps_per_epoch: int
    total: int

    def __post_init__(self):
        if self.every < 0 or self.steps_per_epoch < 1:
            raise BatonError(f"train.checkpoint_every must be >= 0 (0: every epoch), not {self.every}")

    def due(self, step: int) -> bool:
        return step % (self.every or self.steps_per_epoch) == 0 or step == self.total

    def after_step(self, step: int) -> tuple[bool, bool]:
        """(write a checkpoint now, stop after it). Asks every rank whether to stop (a collective):
        call it on every rank once per step."""
        stop = stop_requested()
        return self.due(step) or stop, stop


class RunLifecycle:
    """A training run's directory, resume point, config record and seed (see the module docstring)."""

    def __init__(self, run_dir: str | Path, resume: str | None, seed: int, is_main: bool = True):
        self.run_dir = Path(run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.seed_value = seed
        self.is_main = is_main
        self.resume_from = resolve_resume(resume, self.ckpt_root)

    def record_config(self, cfg) -> None:
        """Write the resolved config to `config.yaml` (main rank); when resuming, first warn of each
        key that differs from what the run was started with."""
        if not self.is_main:
            return
        path = self.run_dir / "config.yaml"
        if self.resume_from is not None and path.is_file():
            for change in config_changes(path.read_text(), cfg):
                log.warning("resuming with a changed config: %s", change)
        write_text_atomic(path, to_yaml(cfg))

    def seed(self) -> None:
        """Seed Python's, numpy's and torch's global generators with the run's seed."""
        random.seed(self.seed_value)
        np.random.seed(self.seed_value)
        torch.manual_seed(self.seed_value)


# Keys whose change between an interrupted run and its resumption does not alter the trajectory.
RESUME_NEUTRAL_KEYS = ("resume", "train.stop_after_steps", "train.log_every", "train.checkpoint_every",
                       "train.keep_last", "train.tensorboard", "train.eval_at_end")


def config_changes(old_yaml: str, cfg: Any, ignore: Sequence[str] = RESUME_NEUTRAL_KEYS) -> list[str]:
    """The keys (dotted, with 'old -> new') on which `cfg` differs from a run's saved config.yaml.

    Used when a run is resumed: continuing with another learning rate or length is allowed (users
    extend runs) but must not go unnoticed, since the result then differs from any single run.
    """
    def flat(node: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(node, dict):
            out: dict[str, Any] = {}
            for k, v in node.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: node}

    saved = OmegaConf.create(old_yaml)
    upgrade_node(type(cfg), saved, "saved config", warn=False)
    old = flat(OmegaConf.to_container(saved))
    new = flat(OmegaConf.to_container(OmegaConf.structured(cfg)))
    # Keys the saved config lacks are schema additions since that run, not the user's changes.
    return [f"{k}: {old[k]!r} -> {new.get(k)!r}" for k in sorted(old)
            if k not in ignore and old[k] != new.get(k)]
