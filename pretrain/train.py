"""`baton pretrain CONFIG [key=value ...]`: pretraining on WebDataset shards, one loop for every method
and strategy.

What is learned is the *method* (`method: clip | dino | glip`, pretrain/method.py); how the module is
spread over ranks is the *strategy* (`train.strategy: ddp | fsdp | deepspeed`, pretrain/strategies/).
This file is the loop between them: schedule, micro-batches, step, logging, evaluation,
checkpoints and stop requests. One process, or one per rank under `torchrun` (gloo on CPU, nccl
on GPU; several nodes through torchrun's rendezvous).

Resuming (`resume=latest` or a checkpoint path) is exact: the checkpoint holds model and optimiser
(in the strategy's format), step, RNG states and every rank's loader position
(`pretrain.data.TrainLoader`), so the resumed run sees exactly the samples the uninterrupted run
would have seen. A DDP checkpoint resumes under FSDP2 and the other way round.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from baton.checkpoint import (latest_checkpoint, load_checkpoint, open_step_dir, publish_step_dir, tmp_step_dir,
                              writing_step)
from baton.cli_config import parse_stage_config
from baton.config import to_yaml
from baton.distributed import all_gather_object, barrier, destroy, init_distributed, peer_failures
from baton.errors import BatonError
from baton.logs import MetricsWriter, setup_logging
from baton.nonfinite import NonFiniteSteps, nonfinite_ranks
from baton.nonfinite import describe as describe_nonfinite
from baton.preemption import EXIT_STOPPED
from baton.progress import logs_above_bar, progress_bar
from baton.run import CheckpointCadence, RunLifecycle, rng_state, set_rng_state, to_channels_last, use_threads
from baton.schedule import lr_factor
from pretrain.config import PretrainConfig
from pretrain.data import TrainLoader, resolve_sources, run_steps_per_epoch
from pretrain.data.device_decode import check_decode_on_device
from pretrain.method import PretrainMethod, method_class
from pretrain.strategies import Strategy, strategy_class



def main(argv: list[str]) -> int:
    cfg = parse_stage_config("baton pretrain", PretrainConfig, argv, __doc__,
                             "configs/demo_clip.yaml")
    return 0 if cfg is None else train(cfg)


def restore(path: Path | None, strategy: Strategy, log) -> tuple[int, dict]:
    """Load the checkpoint the run resumes from (`RunLifecycle.resume_from`) through the strategy;
    return the step to continue from and the checkpoint's state.pt entries ({} for a fresh start)."""
    if path is None:
        return 0, {}
    state, meta = load_checkpoint(path)
    strategy.load(Path(meta["path"]), state)
    set_rng_state(state["rng"])
    log.info("resumed from %s (step %d, written by train.strategy=%s)", meta["path"], state["step"],
             state.get("strategy", "ddp"))
    return int(state["step"]), state


def forever(loader: TrainLoader) -> Iterator[tuple]:
    """The loader's batches across epochs: (*tensors, keys)."""
    while True:
        yield from loader.epoch_batches()


def micro_batches(method: PretrainMethod, batches: Iterator[tuple], accum: int, keys: list) -> Iterator[tuple]:
    """One optimiser step's `accum` micro-batches: the loader's tensors through `method.from_loader`
    (the sample keys go to `keys`)."""
    for _ in range(accum):
        *tensors, micro_keys = next(batches)
        keys += list(micro_keys)
        batch = method.from_loader(tuple(tensors), micro_keys)   # decode_on_device: decoded here
        del tensors   # so that the batch's buffers can go back to their worker (batch_buffers)
        yield batch
        del batch


def train(cfg: PretrainConfig, on_batch: Optional[Callable[[int, list], None]] = None,
          on_step: Optional[Callable[[int, nn.Module], None]] = None) -> int:
    """Run (or resume) pretraining. After each step, `on_batch(step, sample_keys)` and
    `on_step(step, unwrapped_module)` are called when given (tests, tools)."""
    strategy_cls, method_cls = strategy_class(cfg.train.strategy), method_class(cfg.method)
    accum = cfg.train.grad_accum
    if accum < 1:
        raise BatonError(f"train.grad_accum must be >= 1, not {accum}")
    strategy_cls.check_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # before any process group
    if cfg.train.channels_last and not strategy_cls.channels_last_ok:
        raise BatonError(f"train.channels_last is not supported by train.strategy={cfg.train.strategy} (it "
                         f"shards or byte-views contiguous parameters only): use train.strategy=ddp or "
                         f"train.channels_last=false")
    shards = resolve_sources(cfg.data.train_shards)  # fails fast, naming a missing shard
    info = init_distributed(cfg.train.device)
    check_decode_on_device(cfg, method_cls, info.device)
    shards.check_enough_shards(cfg.data.mode, info.world_size, cfg.data.workers)
    run_dir = Path(cfg.run_dir)
    log = setup_logging(run_dir, info.rank)
    run = RunLifecycle(run_dir, cfg.resume, cfg.seed, is_main=info.is_main)
    num_samples, epoch_steps = run_steps_per_epoch(cfg, info.world_size, shards)  # optimiser steps
    total = cfg.train.epochs * epoch_steps
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps)

    use_threads(cfg.train.threads)
    run.seed()
    method = method_cls(cfg, info)
    method.epoch_steps = epoch_steps  # the one count the schedule and the method's epochs follow
    model = method.build_model()
    if cfg.train.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise BatonError(f"train.grad_checkpointing: the {cfg.method} model has no set_grad_checkpointing")
        model.set_grad_checkpointing(True)
    if cfg.train.channels_last:
        model = to_channels_last(model)
    n_params = sum(p.numel() for p in model.parameters())
    strategy = strategy_cls(cfg, info, method)
    with peer_failures("the model's setup (broadcast or resume)"):
        net, optimizer = strategy.setup(model, method.param_groups)
        step, resumed = restore(run.resume_from, strategy, log)
    loader_state = resumed.get("loader")
    nonfinite = NonFiniteSteps(cfg.train.max_nonfinite_steps, resumed.get("nonfinite_steps", ()))
    loader = TrainLoader(shards, cfg.data, method.sample_map(strategy.model), seed=cfg.seed, rank=info.rank,
                         world_size=info.world_size, steps=epoch_steps * accum)
    if step:
        saved_ranks = (loader_state or {}).get("ranks") or []
        loader.load_state_dict(saved_ranks[info.rank] if len(saved_ranks) == info.world_size else None, step * accum)
    run.record_config(cfg)
    log.info("%s with %s: %d shards, %d samples, %d steps/epoch (x %d micro-batches) x %d ranks, %d steps in all, "
             "%.2f M parameters", cfg.method, strategy.name, len(shards.urls), num_samples, epoch_steps, accum,
             info.world_size, total, n_params / 1e6)

    metrics = MetricsWriter(run_dir, enabled=info.is_main, wandb_project=cfg.train.wandb_project,
                            config={"config": to_yaml(cfg)})
    global_batch = cfg.data.batch_size * accum * info.world_size
    progress = progress_bar(total, "pretrain", initial=step, enabled=info.is_main)
    window = (time.perf_counter(), step)
    stop_at = min(total, cfg.train.stop_after_steps or total)
    stopped = False
    ckpt_root = run.ckpt_root
    cadence = CheckpointCadence(cfg.train.checkpoint_every, epoch_steps, total)

    def checkpoint() -> None:  # collective: every rank's loader position and (sharded) state
        ranks = all_gather_object(loader.state_dict())
        if info.is_main:
            open_step_dir(ckpt_root, step)
        barrier()
        with writing_step(ckpt_root, step):  # each rank's part: a failure removes the step's temporary dir
            extra = strategy.save(tmp_step_dir(ckpt_root, step))
        barrier()
        if info.is_main:
            skipped = Counter()
            for r in ranks:
                skipped.update(r["skipped"])
            epoch = max(step - 1, 0) // epoch_steps
            state = {**extra, "step": step, "epoch": epoch, "rng": rng_state(), "config": to_yaml(cfg),
                     "strategy": strategy.name, "method": method.name, "scheduler": {"last_epoch": step},
                     "loader": {"ranks": ranks, "skipped": dict(skipped)}, "nonfinite_steps": nonfinite.steps}
            publish_step_dir(ckpt_root, step, state, keep_last=cfg.train.keep_last,
                             meta={"epoch": epoch, "method": method.name, "strategy": strategy.name,
                                   "model": method.model_label()})
        barrier()

    batches = forever(loader)
    # a peer lost in any collective of a step (DDP's, the method's, a checkpoint's): one clear error
    with logs_above_bar(log), peer_failures(lambda: f"step {step + 1} of {total}"):
        while step < stop_at and not stopped:
            for group in optimizer.param_groups:
                group["lr"] = cfg.optim.lr * lr_factor(step, total, cfg.optim.warmup_steps)
            method.adjust_optimizer(optimizer, step, total)
            lr = optimizer.param_groups[0]["lr"]
            keys: list = []
            nonfinite.snapshot(strategy.model)   # its buffers, should this step be skipped
            losses, extras = method.accumulate(net, strategy, micro_batches(method, batches, accum, keys), step, total)
            # every rank learns whether any rank's loss is not finite, before the update that would
            # spread it into the weights and the next checkpoint
            step_losses = torch.stack(losses)
            bad = nonfinite_ranks(step_losses, info.rank, info.world_size)
            skipped_step = bool(bad)
            if skipped_step:   # raises past train.max_nonfinite_steps; else nothing of it is applied
                nonfinite.skip(step + 1, describe_nonfinite(step_losses, bad, info.rank, info.world_size),
                               lambda: latest_checkpoint(ckpt_root), f"lower optim.lr (now {cfg.optim.lr})")
                if not strategy.skip_step():
                    raise BatonError(f"train.strategy={strategy.name} applied the update of step {step + 1}, whose "
                                     f"loss is not finite (its gradients were finite, so it did not skip it): "
                                     f"stopping before it is saved. The last good checkpoint is "
                                     f"{latest_checkpoint(ckpt_root) or 'none yet'}; continue with resume=latest")
                metrics.log(step + 1, nonfinite_steps=len(nonfinite.steps))
            else:
                strategy.step(cfg.optim.grad_clip)
                strategy.after_step(step, total)
            step += 1
            progress.update(1)
            if on_batch is not None:
                on_batch(step, keys)
            if on_step is not None:
                on_step(step, strategy.model)
            if (step % cfg.train.log_every == 0 or step == total) and not skipped_step:
                seconds, done = time.perf_counter() - window[0], step - window[1]
                row = dict(loss=torch.stack(losses).mean().item(), lr=lr, **extras,
                           samples_per_s=done * global_batch / max(seconds, 1e-9), epoch=(step - 1) // epoch_steps)
                metrics.log(step, **row)
                progress.set_postfix(loss=f"{row['loss']:.3f}", sps=f"{row['samples_per_s']:.0f}")
                log.info("step %d/%d loss %.4f lr %.2e %.0f samples/s", step, total, row["loss"], lr,
                         row["samples_per_s"])
                window = (time.perf_counter(), step)
            if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or step == total):
                scores = method.evaluate(strategy.model, step)
                if scores:
                    metrics.log(step, **scores)
            save, stopped = cadence.after_step(step)  # stopped: a launcher asked to (preemption)
            if save:
                checkpoint()
    batches.close()  # ends the loader's worker processes
    if stopped:
        log.info("stopped on request after step %d with a checkpoint; continue with resume=latest", step)
    elif step < total:
        log.info("stopped after step %d (train.stop_after_steps); continue with resume=latest", step)
    progress.close()
    metrics.close()
    barrier()
    destroy()
    return EXIT_STOPPED if stopped else 0
