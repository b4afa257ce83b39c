"""`baton pretrain CONFIG [key=value ...]`: contrastive (CLIP) pretraining on WebDataset shards.

One process, or one per rank under `torchrun` (DDP; gloo on CPU, nccl on GPU). The loss is
open_clip's `ClipLoss` with local logits and gathered features (gradients flow through the
gather), so N ranks x B samples give the gradients of one N*B batch.

Resuming (`resume=latest` or a checkpoint path) is exact: the checkpoint holds model, optimiser,
scheduler, step and RNG states, and every rank's loader position (`pretrain.data.TrainLoader`:
epoch, batch, each worker's place in its stream, skipped-sample counts), so the resumed run sees
exactly the samples the uninterrupted run would have seen.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from baton.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from baton.config import config_changes, load_config, to_yaml
from baton.distributed import DistInfo, all_gather_object, barrier, destroy, init_distributed
from baton.errors import BatonError
from baton.io import write_text_atomic
from baton.logs import MetricsWriter, setup_logging
from baton.preemption import EXIT_STOPPED, stop_requested
from baton.schedule import lr_factor
from pretrain.clip.model import build_clip, build_tokenizer, build_transforms, clamp_logit_scale, preprocess_cfg
from pretrain.config import OptimConfig, PretrainConfig
from pretrain.data import SampleToPair, TrainLoader, resolve_sources, steps_per_epoch

USAGE = "usage: baton pretrain CONFIG [key=value ...]   e.g. baton pretrain configs/demo_clip.yaml train.epochs=2"


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    return train(load_config(PretrainConfig, argv[0], argv[1:]))


# ---------------------------------------------------------------- building blocks

def make_optimizer(model: nn.Module, ocfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW; like open_clip_train, no weight decay on gains, biases, embeddings and logit_scale."""
    def exempt(name: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or any(t in name for t in ("bias", "ln", "norm", "embedding", "logit_scale"))

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in params if not exempt(n, p)], "weight_decay": ocfg.weight_decay},
              {"params": [p for n, p in params if exempt(n, p)], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=ocfg.lr, betas=tuple(ocfg.betas), eps=ocfg.eps)


def make_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int):
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup))


def make_loss(info: DistInfo) -> nn.Module:
    import open_clip

    return open_clip.ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True,
                              rank=info.rank, world_size=info.world_size)


def forward_loss(model: nn.Module, images: torch.Tensor, texts: torch.Tensor, loss_fn: nn.Module) -> torch.Tensor:
    out = model(images, texts)
    return loss_fn(out["image_features"], out["text_features"], out["logit_scale"])


def train_step(net: nn.Module, images: torch.Tensor, texts: torch.Tensor, loss_fn: nn.Module,
               optimizer: torch.optim.Optimizer, autocast: Callable, grad_clip: float | None) -> torch.Tensor:
    """One optimiser step on a (local) batch; returns the detached loss."""
    with autocast():
        loss = forward_loss(net, images, texts, loss_fn)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    optimizer.step()
    return loss.detach()


def autocast_for(precision: str, device: torch.device) -> Callable:
    if precision not in ("auto", "fp32", "bf16"):
        raise BatonError(f"train.precision must be auto, fp32 or bf16, not {precision!r}")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext


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


def restore(cfg: PretrainConfig, model, optimizer, scheduler, log) -> tuple[int, dict | None]:
    """Load the checkpoint named by `cfg.resume` into the objects; return the step to continue from
    and the saved loader state (None if there is none)."""
    if cfg.resume is None:
        return 0, None
    if cfg.resume == "latest":
        found = latest_checkpoint(Path(cfg.run_dir) / "checkpoints")
        if found is None:
            log.info("resume=latest: no checkpoint in %s yet, starting from step 0", cfg.run_dir)
            return 0, None
        path = found
    else:
        path = cfg.resume
    state, meta = load_checkpoint(path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    log.info("resumed from %s (step %d)", meta["path"], state["step"])
    return int(state["step"]), state.get("loader")


# ---------------------------------------------------------------- the run

def train(cfg: PretrainConfig, on_batch: Optional[Callable[[int, list], None]] = None) -> int:
    """Run (or resume) pretraining. `on_batch(step, sample_keys)`, if given, is called after each step."""
    shards = resolve_sources(cfg.data.train_shards)  # fails fast, naming a missing shard
    info = init_distributed(cfg.train.device)
    shards.check_enough_shards(cfg.data.mode, info.world_size, cfg.data.workers)
    run_dir = Path(cfg.run_dir)
    log = setup_logging(run_dir, info.rank)
    num_samples = cfg.data.num_samples or shards.num_samples
    if not num_samples:
        raise BatonError(f"cannot tell how many samples {cfg.data.train_shards} holds (no stats.json "
                         f"beside the shards): set data.num_samples")
    spe = steps_per_epoch(num_samples, cfg.data.batch_size, info.world_size)
    total = cfg.train.epochs * spe if cfg.train.max_steps is None else min(cfg.train.epochs * spe, cfg.train.max_steps)

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = build_clip(cfg.model).to(info.device)
    pp = preprocess_cfg(model)
    if cfg.data.image_size not in (None, pp["image_size"]):
        raise BatonError(f"data.image_size={cfg.data.image_size} but the model takes {pp['image_size']} px; "
                         f"unset data.image_size or change the model's vision_cfg.image_size")
    to_pair = SampleToPair(build_transforms(pp, cfg.data.augment)[0], build_tokenizer(cfg.model), cfg.data.caption)
    optimizer = make_optimizer(model, cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim.warmup_steps, total)
    step, loader_state = restore(cfg, model, optimizer, scheduler, log)
    loader = TrainLoader(shards, cfg.data, to_pair, seed=cfg.seed, rank=info.rank, world_size=info.world_size,
                         steps=spe)
    if step:
        saved_ranks = (loader_state or {}).get("ranks") or []
        loader.load_state_dict(saved_ranks[info.rank] if len(saved_ranks) == info.world_size else None, step)
    if info.is_main:
        if step and (run_dir / "config.yaml").is_file():
            for change in config_changes((run_dir / "config.yaml").read_text(), cfg):
                log.warning("resuming with a changed config: %s", change)
        write_text_atomic(run_dir / "config.yaml", to_yaml(cfg))
    log.info("%d shards, %d samples, %d steps/epoch x %d ranks, %d steps in all, %.2f M parameters",
             len(shards.urls), num_samples, spe, info.world_size, total,
             sum(p.numel() for p in model.parameters()) / 1e6)

    net = model
    if info.distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    loss_fn, autocast = make_loss(info), autocast_for(cfg.train.precision, info.device)
    metrics = MetricsWriter(run_dir, enabled=info.is_main)
    global_batch = cfg.data.batch_size * info.world_size
    progress = tqdm(total=total, initial=step, disable=not info.is_main, desc="pretrain", dynamic_ncols=True)
    window = (time.perf_counter(), step)
    epoch = step // spe
    stop_at = min(total, cfg.train.stop_after_steps or total)
    stopped = False

    def checkpoint() -> None:
        ranks = all_gather_object(loader.state_dict())  # every rank's data position (a collective)
        if info.is_main:
            skipped = Counter()
            for r in ranks:
                skipped.update(r["skipped"])
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "step": step, "epoch": epoch,
                     "rng": rng_state(), "config": to_yaml(cfg),
                     "loader": {"ranks": ranks, "skipped": dict(skipped)}}
            save_checkpoint(run_dir / "checkpoints", step, state, keep_last=cfg.train.keep_last,
                            meta={"epoch": epoch, "method": "clip", "model": cfg.model.name})

    with logging_redirect_tqdm(loggers=[log]):  # log lines print above the progress bar
        while step < total:
            for images, texts, keys in loader.epoch_batches():  # the rest of the loader's current epoch
                lr = optimizer.param_groups[0]["lr"]
                loss = train_step(net, images.to(info.device), texts.to(info.device), loss_fn, optimizer,
                                  autocast, cfg.optim.grad_clip)
                scheduler.step()
                clamp_logit_scale(model)
                step += 1
                progress.update(1)
                if on_batch is not None:
                    on_batch(step, keys)
                if step % cfg.train.log_every == 0 or step == total:
                    seconds, done = time.perf_counter() - window[0], step - window[1]
                    row = dict(loss=loss.item(), lr=lr, logit_scale=model.logit_scale.exp().item(),
                               samples_per_s=done * global_batch / max(seconds, 1e-9), epoch=epoch)
                    metrics.log(step, **row)
                    progress.set_postfix(loss=f"{row['loss']:.3f}", sps=f"{row['samples_per_s']:.0f}")
                    log.info("step %d/%d loss %.4f lr %.2e scale %.1f %.0f samples/s", step, total,
                             row["loss"], lr, row["logit_scale"], row["samples_per_s"])
                    window = (time.perf_counter(), step)
                saved = step % cfg.train.checkpoint_every == 0 or step == total
                if saved:
                    checkpoint()
                if stop_requested():  # a launcher asked to stop (preemption): checkpoint, then return
                    if not saved:
                        checkpoint()
                    stopped = True
                if step >= stop_at or stopped:
                    break
            if step >= stop_at or stopped:
                break
            epoch += 1
    if stopped:
        log.info("stopped on request after step %d with a checkpoint; continue with resume=latest", step)
    elif step < total:
        log.info("stopped after step %d (train.stop_after_steps); continue with resume=latest", step)
    progress.close()
    metrics.close()
    barrier()
    destroy()
    return EXIT_STOPPED if stopped else 0
