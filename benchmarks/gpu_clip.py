"""CLIP (and DINO) training-step parts of benchmarks/gpu.sh: one process, one rank, each strategy.

- synthetic: batches made once on the device (float images, random tokens), then the engine's own
  per-step calls (pretrain/train.py: lr, method.adjust_optimizer, strategy.accumulating /
  autocast / prepare + method.on_device, method.loss, strategy.backward, a finite-loss check that
  synchronises as the engine's does, strategy.step, strategy.after_step): the model's ceiling.
- shards: `pretrain.train.train` itself on JPEG shards through baton's loader (resampled, the
  workers decoding, or `data.decode_on_device`), timed by its `on_step` hook: what the data path
  allows. No checkpoint is written (`train.stop_after_steps`).

The strategies run in one process with a world of one (ddp: the plain module; fsdp and
deepspeed: a single-rank process group, as `ensure_process_group` makes).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from gpu_common import (REPO, TINY_CLIP, TINY_DINO, count_flops, error_row, free, peak_memory, reset_peak_memory,
                        sync, with_mfu)

STRATEGIES = ("ddp", "fsdp", "deepspeed")


def clip_config(model: str, smoke: bool, dev: torch.device, overrides: list[str] = ()):
    from baton.config import load_config
    from pretrain.config import PretrainConfig

    base = ["train.zero_stage=2", f"train.device={dev.type}",
            f"train.precision={'fp32' if smoke else 'bf16'}", "optim.warmup_steps=0", "clip.caption=txt"]
    if smoke:
        base += ["data.batch_size=8"]
    cfg = load_config(PretrainConfig, REPO / "configs" / "clip_vit_b16.yaml", [*base, *overrides])
    if smoke:
        cfg.clip.name, cfg.clip.config = "tiny", dict(TINY_CLIP)
    else:
        cfg.clip.name = model
    return cfg


def dino_config(smoke: bool, dev: torch.device, overrides: list[str] = ()):
    from baton.config import load_config
    from pretrain.config import PretrainConfig

    base = [f"train.device={dev.type}", f"train.precision={'fp32' if smoke else 'bf16'}", "data.num_samples=100000",
            "optim.warmup_steps=0"]
    if smoke:
        base += ["data.batch_size=4", *(f"{k}={v}" for k, v in TINY_DINO.items())]
    return load_config(PretrainConfig, REPO / "configs" / "dino_vit_s16.yaml", [*base, *overrides])


def synthetic_batch(method, model, cfg, dev: torch.device, batch: int) -> tuple:
    """Normalised float images and random tokens (CLIP) or crops (DINO), on the device."""
    g = torch.Generator().manual_seed(0)
    if cfg.method == "dino":
        d = cfg.dino
        sizes = [d.global_crop_size] * 2 + [d.local_crop_size] * d.n_local_crops
        return tuple(torch.randn(batch, 3, s, s, generator=g).to(dev) for s in sizes)
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    ctx = cfg.clip.config["text_cfg"]["context_length"] if cfg.clip.config else 77
    return (torch.randn(batch, 3, size, size, generator=g).to(dev),
            torch.randint(1, 49000, (batch, ctx), generator=g).to(dev))


def flops_per_sample(method, model, cfg, dev: torch.device) -> float:
    """FlopCounterMode over one forward + backward of the unwrapped model at batch 4, per sample."""
    model.to(dev)
    batch = synthetic_batch(method, model, cfg, dev, 4)

    def step():
        loss, _ = method.loss(model, batch, 0, 1)
        loss.backward()

    flops = count_flops(step)
    model.zero_grad(set_to_none=True)
    return flops / 4


def step_loop(cfg, dev: torch.device, steps: int, warmup: int) -> dict:
    """Build the method and strategy of `cfg`, run warmup + steps engine steps on one synthetic batch."""
    from baton.distributed import DistInfo
    from pretrain.method import build_method
    from pretrain.strategies import strategy_class

    torch.manual_seed(cfg.seed)
    info = DistInfo(device=dev)
    method = build_method(cfg, info)
    model = method.build_model()
    fps = flops_per_sample(method, model, cfg, dev)
    strategy = strategy_class(cfg.train.strategy)(cfg, info, method)
    strategy_class(cfg.train.strategy).check_config(cfg, 1)
    net, optimizer = strategy.setup(model, method.param_groups)
    batch = synthetic_batch(method, strategy.model, cfg, dev, cfg.data.batch_size)
    total = warmup + steps
    t_start = time.perf_counter()
    for i in range(total):
        if i == warmup:
            sync(dev)
            warm_s = time.perf_counter() - t_start
            reset_peak_memory(dev)
            t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = cfg.optim.lr
        method.adjust_optimizer(optimizer, i, total)
        with strategy.accumulating(True):
            with strategy.autocast():
                loss, _ = method.loss(net, strategy.prepare(batch, method.on_device), i, total)
            strategy.backward(loss, 1, True)
        if not torch.isfinite(loss.detach()).item():   # the engine's per-step check (a sync)
            raise RuntimeError(f"loss not finite at step {i}")
        strategy.step(cfg.optim.grad_clip)
        strategy.after_step(i, total)
    sync(dev)
    seconds = time.perf_counter() - t0
    memory, kind = peak_memory(dev)
    b = cfg.data.batch_size
    row = {"batch": b, "precision": strategy.precision, "steps": steps, "step_s": seconds / steps,
           "samples_per_s": b * steps / seconds, "peak_memory_bytes": memory, "memory_kind": kind,
           "flops_per_sample": fps, "warmup_steps": warmup, "warmup_s": warm_s, "loss": float(loss.detach().float())}
    del net, optimizer, strategy, model, method, batch
    return row


def run_synthetic(result, args, dev: torch.device, compile_: bool) -> None:
    models = ["tiny"] if args.smoke else ["ViT-B-16", "ViT-B-32"]
    steps, warmup = (3, 1) if args.smoke else (10, 3 if not compile_ else 3)
    for model in models:
        for strategy in STRATEGIES:
            base = {"model": model, "strategy": strategy, "data": "synthetic", "compile": compile_}
            try:
                cfg = clip_config(model, args.smoke, dev, [f"train.strategy={strategy}",
                                                           f"train.compile={str(compile_).lower()}"])
                result.add(with_mfu({**base, **step_loop(cfg, dev, steps, warmup)}, dev))
            except Exception as e:  # a strategy that cannot run here (deepspeed missing, OOM): say so, go on
                result.add(error_row(base, e))
            free(dev)


def run_dino(result, args, dev: torch.device) -> None:
    base = {"model": "tiny ViT" if args.smoke else "vit_small_patch16_224", "strategy": "ddp",
            "data": "synthetic multi-crop", "compile": False}
    steps, warmup = (3, 1) if args.smoke else (10, 3)
    try:
        cfg = dino_config(args.smoke, dev, ["train.strategy=ddp"])
        d = cfg.dino
        base["crops"] = f"2 x {d.global_crop_size} px + {d.n_local_crops} x {d.local_crop_size} px"
        result.add(with_mfu({**base, **step_loop(cfg, dev, steps, warmup)}, dev))
    except Exception as e:
        result.add(error_row(base, e))


def shards_run(cfg, dev: torch.device, steps: int, warmup: int) -> dict:
    """`pretrain.train.train` for warmup + steps steps; timing and peak memory after the warm-up."""
    from pretrain.train import train

    stamps: dict[int, float] = {}

    def on_step(step: int, _model) -> None:
        sync(dev)
        stamps[step] = time.perf_counter()
        if step == warmup:
            reset_peak_memory(dev)

    start = time.perf_counter()
    train(cfg, on_step=on_step)
    seconds = stamps[warmup + steps] - stamps[warmup]
    memory, kind = peak_memory(dev)
    b = cfg.data.batch_size
    return {"batch": b, "steps": steps, "step_s": seconds / steps, "samples_per_s": b * steps / seconds,
            "peak_memory_bytes": memory, "memory_kind": kind, "warmup_steps": warmup,
            "warmup_s": stamps[warmup] - start, "workers": cfg.data.workers}


def run_shards(result, args, dev: torch.device, shards: Path, work: Path) -> None:
    """The engine on the shards: each strategy with the workers decoding, ddp with decode_on_device."""
    import os

    from baton.distributed import DistInfo
    from pretrain.method import build_method

    steps, warmup = (3, 1) if args.smoke else (10, 3)
    workers = 1 if args.smoke else max(1, min(12, (os.cpu_count() or 2) - 2))
    plan = [("tiny" if args.smoke else "ViT-B-16", s, False) for s in STRATEGIES]
    plan += [("tiny" if args.smoke else "ViT-B-16", "ddp", True)]
    if not args.smoke:
        plan += [("ViT-B-32", "ddp", False), ("ViT-B-32", "ddp", True)]
    flops: dict[str, float] = {}
    for model, strategy, on_device in plan:
        base = {"model": model, "strategy": strategy, "data": "shards, " + ("decode_on_device" if on_device
                                                                            else "workers decode"), "compile": False}
        try:
            run_dir = Path(tempfile.mkdtemp(prefix=f"{model}_{strategy}_", dir=work))
            cfg = clip_config(model, args.smoke, dev, [
                f"train.strategy={strategy}", f"data.train_shards={shards}", f"data.workers={workers}",
                "data.mode=resampled", f"data.decode_on_device={str(on_device).lower()}", f"run_dir={run_dir}",
                "train.max_steps=1000", f"train.stop_after_steps={warmup + steps}", "train.checkpoint_every=1000000",
                "train.log_every=1000000", "train.eval_every=0", "resume=null"])
            if model not in flops:
                method = build_method(cfg, DistInfo(device=dev))
                flops[model] = flops_per_sample(method, method.build_model(), cfg, dev)
                free(dev)
            result.add(with_mfu({**base, **shards_run(cfg, dev, steps, warmup), "flops_per_sample": flops[model]}, dev))
        except Exception as e:
            result.add(error_row(base, e))
        free(dev)
