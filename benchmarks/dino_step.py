"""DINO step throughput: baton's engine vs a loop written straight from the paper's pseudo-code, one run.

Both train the same networks (the timm backbone + DINO head of `--config`, student and EMA teacher
from the same seed) on the same batches: each reads the shards through baton's loader with the same
multi-crop sample map, seed, batch size and worker count, so the crops are identical and any
difference is the training step.

- baton: `pretrain.train.train` (method dino, train.strategy ddp, one process: the whole engine,
  with its schedules, param groups, frozen last layer, metrics, progress bar);
- reference: Algorithm 1 of Caron et al. 2021 (multi-crop form, as facebookresearch/dino runs it):
  student on all crops, teacher on the 2 global crops, H(t, s) over every pair of a teacher view and
  a different student view, backward, gradient clipping, AdamW step, EMA of the teacher, EMA of the
  centre. Crops of one resolution go through a network as one batch (the reference's
  MultiCropWrapper), as baton does.

Timed: the seconds between the end of step `--skip` and the end of the last step (the first steps
warm up allocators and the loader; the engine's final checkpoint comes after the last step and is
not counted). `--repeats` interleaved runs each; the best run of each counts (the machine may be
shared), all are printed.

    python benchmarks/dino_step.py [--config configs/dino_demo.yaml] [--steps 8] [--skip 2] [--repeats 3]

`--losses`: instead of timing, one run of each for `--steps` steps and their losses every 5 steps
side by side: is a collapse (the loss going to ln(out_dim)) the engine's or the recipe's? (The
reference loop keeps lr, momentum and weight decay constant; the engine runs its schedules.)

    python benchmarks/dino_step.py --losses --steps 55 [overrides...]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from baton.config import load_config  # noqa: E402
from baton.distributed import DistInfo  # noqa: E402
from pretrain.config import PretrainConfig  # noqa: E402
from pretrain.data import TrainLoader, resolve_sources, steps_per_epoch  # noqa: E402
from pretrain.dino.method import DinoMethod  # noqa: E402
from pretrain.train import train  # noqa: E402


def engine_run(cfg: PretrainConfig, steps: int, skip: int) -> float:
    """Seconds for steps skip+1..steps of baton's engine."""
    stamps: dict[int, float] = {}
    train(cfg, on_step=lambda step, _model: stamps.__setitem__(step, time.perf_counter()))
    return stamps[steps] - stamps[skip]


def H(teacher_out: torch.Tensor, student_out: torch.Tensor, center: torch.Tensor, tpt: float, tps: float):
    """The pseudo-code's H: cross-entropy of the centred, sharpened teacher softmax and the student's."""
    t = F.softmax((teacher_out.detach() - center) / tpt, dim=-1)
    return -(t * F.log_softmax(student_out / tps, dim=-1)).sum(dim=-1).mean()


def reference_run(cfg: PretrainConfig, steps: int, skip: int, losses: list[float] | None = None) -> float:
    """Seconds for steps skip+1..steps of the paper's loop, same networks and loader (each step's
    loss appended to `losses` if given)."""
    torch.manual_seed(cfg.seed)
    method = DinoMethod(cfg, DistInfo())
    d = method.dino
    model = method.build_model()                    # the same modules (and init) the engine trains
    gs, gt, center = model.student, model.teacher, torch.zeros(1, d.out_dim)
    opt = torch.optim.AdamW(gs.parameters(), lr=cfg.optim.lr * method.lr_scale(), weight_decay=d.weight_decay)
    shards = resolve_sources(cfg.data.train_shards)
    epoch_steps = steps_per_epoch(cfg.data.num_samples or shards.num_samples, cfg.data.batch_size, 1)
    loader = TrainLoader(shards, cfg.data, method.sample_map(model), seed=cfg.seed, rank=0, world_size=1,
                         steps=epoch_steps)
    n_crops, momentum = 2 + d.n_local_crops, d.teacher_momentum
    stamps: dict[int, float] = {}
    step = 0
    batches = loader.epoch_batches()
    try:
        for *crops, _keys in batches:
            crops = method.on_device(tuple(crops))  # the loader hands images over as uint8
            s_out = gs(crops).chunk(n_crops)        # student: every view
            with torch.no_grad():
                t_out = gt(crops[:2]).chunk(2)      # teacher: the global views only
            pairs = [(i, j) for i in range(2) for j in range(n_crops) if i != j]
            loss = sum(H(t_out[i], s_out[j], center, d.teacher_temp, d.student_temp) for i, j in pairs) / len(pairs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(gs.parameters(), cfg.optim.grad_clip)
            opt.step()
            with torch.no_grad():
                for ps, pt in zip(gs.parameters(), gt.parameters()):
                    pt.mul_(momentum).add_((1 - momentum) * ps.detach())
                center = d.center_momentum * center + (1 - d.center_momentum) * torch.cat(t_out).mean(0, keepdim=True)
            step += 1
            stamps[step] = time.perf_counter()
            if losses is not None:
                losses.append(loss.item())
            if step == steps:
                break
    finally:
        batches.close()
    return stamps[steps] - stamps[skip]


def compare_losses(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(PretrainConfig, args.config, [
            f"run_dir={tmp}/run", f"data.train_shards={args.shards}", f"data.batch_size={args.batch_size}",
            f"train.max_steps={args.steps}", "train.checkpoint_every=1000000", "train.log_every=5",
            "train.strategy=ddp", "train.eval_every=0", f"train.threads={args.threads}", *args.overrides])
        reference: list[float] = []
        reference_run(cfg, args.steps, 1, reference)
        train(cfg)
        rows = [json.loads(line) for line in open(f"{tmp}/run/metrics.jsonl")]
        engine = {r["step"]: r["loss"] for r in rows if "loss" in r}
    print(f"ln(out_dim) = {math.log(cfg.dino.out_dim):.2f}; config {args.config} {' '.join(args.overrides)}")
    print("| step | baton engine | paper pseudo-code loop |\n|---:|---:|---:|")
    for step in sorted(engine):
        print(f"| {step} | {engine[step]:.2f} | {reference[step - 1]:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/dino_demo.yaml")
    ap.add_argument("--shards", default="data/emoji/train")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--skip", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--losses", action="store_true", help="compare loss trajectories instead of timing")
    ap.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = ap.parse_args()
    if args.losses:
        return compare_losses(args)
    if not 0 < args.skip < args.steps:
        ap.error("need 0 < --skip < --steps")
    torch.set_num_threads(args.threads)
    timed = args.steps - args.skip
    results: dict[str, list[float]] = {"baton engine (ddp, 1 process)": [], "paper pseudo-code loop": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            cfg = load_config(PretrainConfig, args.config, [
                f"run_dir={tmp}/run{r}", f"data.train_shards={args.shards}", f"data.batch_size={args.batch_size}",
                f"train.max_steps={args.steps}", "train.checkpoint_every=1000000", "train.log_every=1000000",
                "train.strategy=ddp", "train.eval_every=0", f"train.threads={args.threads}", *args.overrides])
            epoch_steps = steps_per_epoch(cfg.data.num_samples or resolve_sources(cfg.data.train_shards).num_samples,
                                  cfg.data.batch_size, 1)
            if args.steps > epoch_steps:
                ap.error(f"--steps {args.steps} is more than one epoch ({epoch_steps} steps) of {args.shards}")
            order = list(zip(results, (engine_run, reference_run)))
            for name, run in (order if r % 2 == 0 else order[::-1]):  # alternate who goes first
                seconds = run(cfg, args.steps, args.skip)
                results[name].append(timed * cfg.data.batch_size / seconds)
                print(f"repeat {r}: {name}: {seconds / timed:.2f} s/step, {results[name][-1]:.1f} samples/s", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"\n{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"commit {commit}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"config {args.config} {' '.join(args.overrides)}, batch {args.batch_size}, steps {args.skip + 1}-{args.steps} timed")
    print("| loop | samples/s (best) | all repeats |\n|---|---:|---|")
    for name, sps in results.items():
        print(f"| {name} | {max(sps):.1f} | {', '.join(f'{s:.1f}' for s in sps)} |")
    base = max(results["paper pseudo-code loop"])
    print(f"\nbaton / reference: {max(results['baton engine (ddp, 1 process)']) / base:.2f}")


if __name__ == "__main__":
    main()
