"""`baton finetune CONFIG [key=value ...]`: deep metric learning on a pretrained backbone.

Batches hold `m_per_class` images of each of `batch_size / m_per_class` classes (pml's
MPerClassSampler), so every batch has positives for pair losses and several classes per proxy
update. Training is step-based; resuming gives the same weights as an uninterrupted run because
(a) each epoch's sample order is drawn from a generator seeded by (seed, epoch), not from global
state, (b) each image's augmentation is drawn from a generator seeded by (seed, step, position),
and (c) a checkpoint holds model, loss and optimiser state and the step. At the end the model is
written to `run_dir/model/` (see finetune/model.py) and, by default, evaluated on the held-out
classes (`run_dir/eval.json`, and `test/*` rows in metrics.jsonl).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from baton.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from baton.cli_config import parse_stage_config
from baton.compat import pml_numpy_rng
from baton.config import to_yaml
from baton.errors import BatonError
from baton.extras import require
from baton.io import write_json_atomic
from baton.logs import MetricsWriter, setup_logging
from baton.nonfinite import NonFiniteSteps
from baton.preemption import EXIT_STOPPED
from baton.progress import logs_above_bar, progress_bar
from baton.registry import unknown_name
from baton.run import (CheckpointCadence, RunLifecycle, autocast_context, choose_device, fused_adam_kwargs,
                       optimizer_step, resolve_precision, to_channels_last, use_threads)
from baton.schedule import lr_factor
from finetune.config import FinetuneConfig
from finetune.datasets import load_dataset, load_image
from finetune.evaluate import require_answerable, retrieval_metrics
from finetune.language import build_language_guide
from finetune.losses import build_loss
from finetune.model import EmbeddingModel, build_transform, embed_images, load_backbone, save_embedding_model


class AugmentedSet(Dataset):
    """Indexed by (item index, augmentation seed): the seed fixes the random crop/flip, so a batch
    is the same in the main process, in a worker, and after a resume."""

    def __init__(self, items, transform):
        self.items, self.transform = items, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        i, seed = key
        img, label, _ = self.items[i]
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only (what the transforms draw from): torch.manual_seed would also
            # queue a CUDA seed per sample, recording a Python stack each time (9 % of a demo step)
            torch.default_generator.manual_seed(seed)
            x = self.transform(load_image(img))
        return x, label


def epoch_batches(labels: list[int], cfg: FinetuneConfig, epoch: int, steps: int) -> list[list[int]]:
    from pytorch_metric_learning.samplers import MPerClassSampler

    bs = cfg.data.batch_size
    sampler = MPerClassSampler(labels, cfg.data.m_per_class, batch_size=bs,
                               length_before_new_iter=steps * bs)
    with pml_numpy_rng(cfg.seed * 1_000_003 + epoch):   # the order depends only on (seed, epoch)
        order = list(iter(sampler))
    return [order[s * bs:(s + 1) * bs] for s in range(steps)]


def _check(cfg: FinetuneConfig, n_classes: int) -> None:
    d = cfg.data
    if d.m_per_class < 1 or d.batch_size % d.m_per_class:
        raise BatonError(f"data.batch_size ({d.batch_size}) must be a multiple of data.m_per_class "
                         f"({d.m_per_class})")
    if d.m_per_class * n_classes < d.batch_size:
        raise BatonError(f"data.batch_size ({d.batch_size}) needs more than {n_classes} train classes x "
                         f"data.m_per_class ({d.m_per_class}); lower data.batch_size")
    if cfg.optim.schedule not in ("cosine", "constant"):
        raise unknown_name("optim.schedule", cfg.optim.schedule, ("cosine", "constant"))


def param_groups(model: EmbeddingModel, criterion: torch.nn.Module, o) -> list[dict]:
    """Backbone at optim.lr, head at optim.head_lr, and the loss's own parameters (SoftTriple's
    centres, pml's proxies, a learnt margin beta) at optim.loss_lr: they start random, so they need
    a rate of their own. `base_lr` is what the schedule scales each step."""
    groups = [{"params": list(model.backbone.parameters()), "lr": o.lr},
              {"params": list(model.head.parameters()) if model.head is not None else [], "lr": o.head_lr},
              {"params": list(criterion.parameters()), "lr": o.loss_lr}]
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["base_lr"] = g["lr"]
    return groups


def build_ema(model: torch.nn.Module, decay: float):
    """timm's weight average of `model` (warm-up on: its decay grows with the step up to `decay`), or
    None for decay 0. Why: a constant learning rate ends on a noisy iterate; the average of the last
    steps is a better one, as a decay of the rate would give, without deciding when to decay."""
    if not decay:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay, use_warmup=True)


@torch.no_grad()
def resize_input(backbone: torch.nn.Module, meta, size: int):
    """The handoff's metadata at input size `size` (data.image_size), once one image of that size
    has gone through the backbone and given its embedding width."""
    was = backbone.training
    backbone.eval()
    try:
        width = backbone(torch.zeros(1, 3, size, size)).shape[-1]
    except Exception as e:  # noqa: BLE001 - a ViT's fixed position embedding, a map that shrinks to nothing
        raise BatonError(f"data.image_size={size}: the backbone {meta.architecture} does not take "
                         f"{size} x {size} images ({type(e).__name__}: {e}); use its own size "
                         f"{meta.preprocess.get('image_size')} (data.image_size=0)") from None
    finally:
        backbone.train(was)
    if width != meta.embedding_dim:
        raise BatonError(f"data.image_size={size}: the backbone {meta.architecture} gives {width} features "
                         f"at that size, not its {meta.embedding_dim}; use data.image_size=0")
    return meta.replace(preprocess={**meta.preprocess, "image_size": size})


def run(cfg: FinetuneConfig) -> dict:
    """Train, save `run_dir/model/`, evaluate; returns a summary (steps, last loss, metrics)."""
    run_dir = Path(cfg.run_dir)
    run = RunLifecycle(run_dir, cfg.resume, cfg.seed)
    ckpt_root, resume = run.ckpt_root, run.resume_from
    log = setup_logging(run_dir)
    run.record_config(cfg)
    use_threads(cfg.train.threads)
    run.seed()
    device = choose_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)

    data = load_dataset(cfg.data.source, cfg.data.root, cfg.seed, cfg.data.max_skipped_fraction)
    train_labels = [y for _, y, _ in data.train]
    n_classes = max(train_labels) + 1
    _check(cfg, n_classes)
    if cfg.train.eval_at_end:  # before training, not after it: a split with no answer is refused,
        n_queries = require_answerable([y for _, y, _ in data.test], f"{cfg.data.root} (test split)")
        require("faiss", "train.eval_at_end (the held-out metrics after training)")  # and no faiss too
    backbone, backbone_meta = load_backbone(cfg.backbone)
    if cfg.data.image_size:   # saved with the model too
        backbone_meta = resize_input(backbone, backbone_meta, cfg.data.image_size)
    if cfg.data.test_resize:  # saved with the model, so `baton evaluate` crops the same way
        backbone_meta = backbone_meta.replace(preprocess={**backbone_meta.preprocess, "resize": cfg.data.test_resize})
    model = EmbeddingModel(backbone, backbone_meta.embedding_dim, cfg.model.embedding_dim or None,
                           freeze_batchnorm=cfg.model.freeze_batchnorm).to(device)
    layout = to_channels_last if cfg.train.channels_last else (lambda t: t)   # train.channels_last
    model = layout(model)
    criterion = build_loss(cfg.loss.name, n_classes, model.embedding_dim, cfg.loss.kwargs,
                           cfg.miner.name, cfg.miner.kwargs).to(device)
    guide = build_language_guide(cfg.language, data.train, cfg.backbone, run_dir, device)  # None: no language
    o = cfg.optim
    groups = param_groups(model, criterion, o)
    optimizer = torch.optim.Adam(groups, eps=o.eps, weight_decay=o.weight_decay, **fused_adam_kwargs(groups))
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    steps_per_epoch = cfg.train.steps_per_epoch or max(1, len(data.train) // cfg.data.batch_size)
    total = cfg.train.epochs * steps_per_epoch
    ema = build_ema(model, cfg.train.ema_decay)   # None: train.ema_decay 0
    step, skipped_before = 0, ()
    if resume is not None:
        state, meta = load_checkpoint(resume, map_location=device)
        model.load_state_dict(state["model"])
        if ema is not None:
            if "ema" not in state:
                raise BatonError(f"{meta['path']} has no weight average (it was written without "
                                 f"train.ema_decay): resume it with train.ema_decay=0, or start a fresh run_dir=")
            ema.load_state_dict(state["ema"])
        criterion.load_state_dict(state["loss"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        step, skipped_before = int(state["step"]), state.get("nonfinite_steps", ())
        log.info("resumed from %s at step %d", meta["path"], step)
    log.info("finetune: %d train images / %d classes, %d test images / %d classes, %d steps on %s",
             len(data.train), n_classes, len(data.test), max(y for _, y, _ in data.test) + 1, total, device)
    if precision != "fp32":
        log.info("train.precision: %s autocast for the forward, fp32 loss and weights", precision)

    tf = build_transform(backbone_meta.preprocess, train=True, crop_scale_min=cfg.data.crop_scale_min,
                         hflip=cfg.data.hflip, crop_padding=cfg.data.crop_padding)
    dataset = AugmentedSet(data.train, tf)
    writer = MetricsWriter(run_dir, tensorboard=cfg.train.tensorboard, wandb_project=cfg.train.wandb_project,
                           config={"config": to_yaml(cfg)})
    cadence = CheckpointCadence(cfg.train.checkpoint_every, steps_per_epoch, total)
    model.train()
    window: list[float] = []
    lang_window: list[float] = []
    last_loss = float("nan")
    t0 = time.time()
    nonfinite = NonFiniteSteps(cfg.train.max_nonfinite_steps, skipped_before)

    def checkpoint(epoch: int) -> None:
        state = {"model": model.state_dict(), "loss": criterion.state_dict(),
                 "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
                 "nonfinite_steps": nonfinite.steps,
                 **({"ema": ema.state_dict()} if ema is not None else {}),
                 **({"scaler": scaler.state_dict()} if scaler is not None else {})}
        save_checkpoint(ckpt_root, step, state, {"epoch": epoch, "total_steps": total},
                        keep_last=cfg.train.keep_last)

    bar = progress_bar(total, "finetune", initial=step)
    redirect = logs_above_bar(log)  # log lines print above the bar; left in the finally below
    redirect.__enter__()
    try:
        for epoch in range(step // steps_per_epoch, cfg.train.epochs):
            batches = epoch_batches(train_labels, cfg, epoch, steps_per_epoch)
            first = step - epoch * steps_per_epoch
            keyed = [[(i, cfg.seed * 1_000_003 + (epoch * steps_per_epoch + s) * 4096 + j)
                      for j, i in enumerate(b)] for s, b in enumerate(batches)][first:]
            loader = DataLoader(dataset, batch_sampler=keyed, num_workers=cfg.data.workers)
            for x, y in loader:
                factor = lr_factor(step, total, o.warmup_steps, o.schedule)
                for g in optimizer.param_groups:
                    g["lr"] = g["base_lr"] * factor
                nonfinite.snapshot(model, criterion)   # their buffers, should this step be skipped
                with autocast_context(precision, device):
                    emb = model(layout(x.to(device)))
                emb = emb.float()   # the loss in fp32: SoftTriple's scaled similarities need the range
                loss = criterion(emb, y.to(device))
                if guide is not None:
                    lang = guide(emb, y)
                    lang_window.append(lang.item())
                    loss = loss + cfg.language.weight * lang
                finite = bool(torch.isfinite(loss))
                if finite:
                    optimizer.zero_grad(set_to_none=True)
                    (scaler.scale(loss) if scaler is not None else loss).backward()   # fp16: scaled
                    optimizer_step(optimizer, model.parameters(), o.grad_clip, scaler)
                    if ema is not None:
                        ema.update(model, step=step)
                    window.append(loss.item())
                else:   # raises past train.max_nonfinite_steps; else nothing of this step is applied
                    nonfinite.skip(step + 1, str(loss.item()), lambda: latest_checkpoint(ckpt_root),
                                   "lower optim.lr / optim.loss_lr or loss.kwargs.la")
                    if lang_window:
                        lang_window.pop()
                    writer.log(step + 1, nonfinite_steps=len(nonfinite.steps))
                step += 1
                bar.update(1)
                if (step % cfg.train.log_every == 0 or step == total) and window:
                    last_loss = float(np.mean(window))
                    extra = {"language_loss": float(np.mean(lang_window))} if lang_window else {}
                    writer.log(step, loss=last_loss, lr=o.lr * factor, epoch=epoch, **extra)
                    log.info("step %d/%d epoch %d loss %.4f%s (%.1fs)", step, total, epoch, last_loss,
                             "".join(f" {k} {v:.4f}" for k, v in extra.items()), time.time() - t0)
                    bar.set_postfix(loss=f"{last_loss:.3f}")
                    window, lang_window = [], []
                save, stop = cadence.after_step(step)  # stop: a launcher asked to (preemption)
                if save:
                    checkpoint(epoch if step % steps_per_epoch else epoch + 1)
                if stop:
                    log.info("stopped on request after step %d with a checkpoint; continue with "
                             "resume=latest", step)
                    return {"steps": step, "stopped": True}
    finally:
        writer.close()
        bar.close()
        redirect.__exit__(None, None, None)

    if ema is not None:   # what is saved and evaluated: the average
        model = ema.module
    model_dir = save_embedding_model(model.cpu(), backbone_meta, run_dir / "model",
                                     source={"backbone": str(cfg.backbone), "steps": step,
                                             "loss": cfg.loss.name, "language": cfg.language.mode,
                                             "run_dir": str(run_dir)})
    summary = {"steps": step, "final_loss": last_loss, "model_dir": str(model_dir)}
    if cfg.train.eval_at_end:
        images = [im for im, _, _ in data.test]
        labels = np.array([y for _, y, _ in data.test])
        emb = embed_images(model, build_transform(backbone_meta.preprocess), images, desc="embed test")
        metrics = retrieval_metrics(emb, labels)
        summary["metrics"] = metrics
        write_json_atomic(run_dir / "eval.json", {**metrics, "n_queries": n_queries,
                                                  "n_classes": int(labels.max() + 1), "split": "test"})
        # the training run's wandb run again (same id, resume="allow"), so the test metrics join its curves
        w = MetricsWriter(run_dir, tensorboard=False, wandb_project=cfg.train.wandb_project)
        w.log(step, **{f"test/{k}": v for k, v in metrics.items()})
        w.close()
        log.info("held-out: %s", ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return summary


def main(argv: list[str] | None = None) -> int:
    cfg = parse_stage_config("baton finetune", FinetuneConfig, argv or [], __doc__,
                             "configs/demo_softtriple.yaml")
    if cfg is None:  # --print-config
        return 0
    summary = run(cfg)
    return EXIT_STOPPED if summary.get("stopped") else 0
