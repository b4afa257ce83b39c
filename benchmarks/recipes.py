"""Finetuning recipes on the demo data: a small seeded search, one `baton finetune` run per cell.

Each cell is a backbone (a handoff, or `random:HANDOFF` for the same architecture untrained) x a
recipe (config overrides on top of `--config`). Every run is the real stage (`baton finetune`,
its held-out evaluation at the end), one after the other on this machine, so wall time is part of
the table: the demo's budget is ~100 s a finetuning on 2 CPU cores. Prints a markdown table
(Recall@1, MAP@R, steps, seconds) and writes it as JSON to `--out`.

    python benchmarks/recipes.py --backbone runs/demo/pretrain/export [--data data/emoji] [--seeds 0]
        [--recipes demo,cosine,previous] [--out runs/recipes.json]

Recipes (overrides of configs/demo_softtriple.yaml):
    demo       the recipe as it is
    cosine     the same with cosine decay of the rates (to 0 at the end)
    previous   the recipe before the small-image search: 2 images a class, random resized crops
               (0.7-1), no shift, tau 0.2, weight decay 1e-4, cosine decay after 20 warm-up steps
    ema        the saved model is a weight average (train.ema_decay 0.999, timm's warm-up)
    frozen_bn  BatchNorm statistics frozen at the backbone's (the published DML recipes' switch)
    centres10  10 centres a class (the SoftTriple paper's K) instead of 4
    epochs36   36 epochs instead of 30 (1.2x the time)
    batch64    batches of 64 classes instead of 16 (a quarter of the updates, 30 epochs): the recipe
               before 2026-12-03
    batch32    batches of 32 classes instead of 16 (half the updates): the recipe before 2026-12-05
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RECIPES = {
    "demo": [],
    "cosine": ["optim.schedule=cosine"],
    "previous": ["data.m_per_class=2", "data.crop_scale_min=0.7", "data.crop_padding=0", "loss.kwargs.tau=0.2",
                 "optim.weight_decay=1e-4", "optim.schedule=cosine", "optim.warmup_steps=20"],
    "ema": ["train.ema_decay=0.999"],
    "frozen_bn": ["model.freeze_batchnorm=true"],
    "centres10": ["loss.kwargs.centers_per_class=10"],
    "epochs36": ["train.epochs=36"],
    "batch64": ["data.batch_size=64", "train.epochs=30"],
    "batch32": ["data.batch_size=32"],
}


def run_cell(config: str, backbone: str, data: str, seed: int, overrides: list[str], run_dir: Path) -> dict:
    t0 = time.time()
    cmd = [sys.executable, "-m", "baton", "finetune", config, f"backbone={backbone}", f"data.root={data}",
           f"seed={seed}", f"run_dir={run_dir}", "train.tensorboard=false", "train.eval_at_end=true", *overrides]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    metrics = json.loads((run_dir / "eval.json").read_text())
    return {"recall@1": metrics["recall@1"], "map@r": metrics["map@r"], "seconds": round(time.time() - t0, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", required=True, help="a CLIP handoff (baton export); random:HANDOFF is added")
    p.add_argument("--config", default="configs/demo_softtriple.yaml")
    p.add_argument("--data", default="data/emoji")
    p.add_argument("--seeds", default="0", help="comma-separated")
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}")
    p.add_argument("--work", default="runs/recipes", help="run directories go here (one per cell)")
    p.add_argument("--out", default="runs/recipes/recipes.json")
    a = p.parse_args()
    unknown = [r for r in a.recipes.split(",") if r not in RECIPES]
    if unknown:
        p.error(f"unknown recipes {unknown}; known: {', '.join(RECIPES)}")
    rows = []
    for recipe in a.recipes.split(","):
        for init, backbone in (("pretrained", a.backbone), ("scratch", f"random:{a.backbone}")):
            for seed in map(int, a.seeds.split(",")):
                run_dir = Path(a.work) / f"{recipe}-{init}-seed{seed}"
                row = {"recipe": recipe, "init": init, "seed": seed,
                       **run_cell(a.config, backbone, a.data, seed, RECIPES[recipe], run_dir)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n| recipe | init | seed | Recall@1 | MAP@R | seconds |\n|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['recipe']} | {r['init']} | {r['seed']} | {100 * r['recall@1']:.1f} | {100 * r['map@r']:.1f} "
              f"| {r['seconds']} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
