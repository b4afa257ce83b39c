"""Pretraining step throughput: `baton pretrain` vs open_clip's own training program (`open_clip_train`).

Both train the same open_clip model (the model of `--config`, default the demo's
configs/demo_clip.yaml) on the same WebDataset shards, with the same batch size, the same
torch thread count (OMP_NUM_THREADS and baton's train.threads), the same device and precision
(`--device`, `--precision`; default cpu, fp32), the same number of DataLoader
workers, one pass over the shards (baton `data.mode=epoch_exact`, open_clip_train's default
non-resampled webdataset), the `txt` caption, AdamW with the config's lr / betas / eps / weight decay /
warm-up and gradient clipping, and the same crop scale. One side after the other, `--repeats`
times, alternating which goes first.

What is measured: steady-state step time, from each program's own per-step log (every step logged):
baton's metrics.jsonl `samples_per_s` (wall time from one step's end to the next, data wait included)
and open_clip_train's `Batch (t)` (the same span). The first `--skip` steps of each run (start-up,
worker spawn, first shards) are left out; samples/s of a run = batch / mean step time of the rest.

open_clip_train 3.3 does not run with webdataset >= 0.2.96 as shipped: webdataset's tar expander now
yields an end-of-shard marker `{}` that open_clip_train's `group_by_keys_nothrow` cannot take
(KeyError 'fname'; mlfoundations/open_clip#935, webdataset/webdataset#384). This script runs it
with the fix given there, `eof_value=None` (`--as-open-clip-train`), and changes nothing else.
open_clip_train also needs pandas (the `bench` extra).

    python benchmarks/pretrain_vs_open_clip.py [--repeats 3] [--shards data/emoji/train] [--threads 2]
"""

from __future__ import annotations

import sys


def run_open_clip_train(argv: list[str]) -> None:
    """open_clip_train.main with webdataset's end-of-shard marker turned off (see the module docstring)."""
    import functools

    import open_clip_train.data
    import open_clip_train.main
    from webdataset.tariterators import tar_file_expander

    open_clip_train.data.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)
    open_clip_train.main.main(argv)


if __name__ == "__main__" and sys.argv[1:2] == ["--as-open-clip-train"]:
    run_open_clip_train(sys.argv[2:])
    sys.exit(0)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OPEN_CLIP_PRECISION = {"fp32": "fp32", "bf16": "amp_bf16", "fp16": "amp"}   # baton's -> open_clip_train's
OPEN_CLIP_STEP = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+ .*?Batch \(t\): ([0-9.]+)")


def baton_command(args, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "baton", "pretrain", args.config, f"run_dir={run_dir}",
            f"data.train_shards={args.shards}", f"data.num_samples={args.num_samples}",
            f"data.batch_size={args.batch_size}", f"data.workers={args.workers}", "data.mode=epoch_exact",
            "clip.caption=txt", "train.epochs=1", "train.max_steps=null", "train.stop_after_steps=null",
            f"train.threads={args.threads}", f"train.precision={args.precision}", f"train.device={args.device}",
            "train.log_every=1",
            "train.checkpoint_every=1000000", "resume=null"]


def open_clip_command(args, cfg, model_dir: Path, logs: Path, name: str) -> list[str]:
    from pretrain.data import resolve_sources

    urls = resolve_sources(args.shards).urls   # the shards baton reads, as one brace list
    pattern = f"{Path(urls[0]).parent}/{{{','.join(Path(u).name for u in urls)}}}"
    o = cfg.optim
    return [sys.executable, __file__, "--as-open-clip-train", "--train-data", pattern, "--dataset-type", "webdataset",
            "--train-num-samples", str(args.num_samples), "--model", f"local-dir:{model_dir}",
            "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--epochs", "1",
            "--device", args.device, "--precision", OPEN_CLIP_PRECISION[args.precision],
            "--log-every-n-steps", "1", "--save-frequency", "0",
            "--logs", str(logs), "--name", name, "--report-to", "", "--seed", str(cfg.seed),
            "--lr", str(o.lr), "--wd", str(o.weight_decay), "--beta1", str(o.betas[0]), "--beta2", str(o.betas[1]),
            "--eps", str(o.eps), "--warmup", str(o.warmup_steps), "--grad-clip-norm", str(o.grad_clip or 1e9),
            "--aug-cfg", f"scale=({cfg.clip.augment.scale[0]},{cfg.clip.augment.scale[1]})"]


def baton_step_times(run_dir: Path, batch: int) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [batch / r["samples_per_s"] for r in sorted(rows, key=lambda r: r["step"]) if "samples_per_s" in r]


def open_clip_step_times(log: Path) -> list[float]:
    return [float(m.group(2)) for m in OPEN_CLIP_STEP.finditer(log.read_text())]


def run(side: str, cmd: list[str], env: dict, log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"{side} failed (exit {proc.returncode}); see {log}:\n" + log.read_text()[-3000:])
    return time.perf_counter() - start


def summarise(times: list[float], skip: int, batch: int, wall: float, load: tuple) -> dict:
    steady = times[skip:]
    if not steady:
        sys.exit(f"only {len(times)} steps logged; lower --skip or raise --num-samples")
    mean = statistics.fmean(steady)
    return {"steps": len(times), "measured_steps": len(steady), "mean_step_s": mean,
            "median_step_s": statistics.median(steady), "samples_per_s": batch / mean, "wall_s": wall,
            "load_before": load[0], "load_after": load[1]}


def machine() -> dict:
    import open_clip
    import torch
    import webdataset

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "open_clip": open_clip.__version__, "webdataset": getattr(webdataset, "__version__", "?"),
            "commit": commit + (" (+ uncommitted changes)" if dirty else ""),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/demo_clip.yaml")
    p.add_argument("--shards", default="data/emoji/train")
    p.add_argument("--num-samples", type=int, default=3456, help="samples per run (27 steps of 128)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip", type=int, default=5, help="first steps of each run left out (start-up)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--precision", default="fp32", choices=sorted(OPEN_CLIP_PRECISION),
                   help="baton's train.precision (open_clip_train: fp32 / amp_bf16 / amp)")
    p.add_argument("--work", default=None, help="directory for runs and logs (default: a temporary one)")
    args = p.parse_args()

    from baton.config import load_config
    from pretrain.clip.model import model_config_dict
    from pretrain.config import PretrainConfig

    cfg = load_config(PretrainConfig, args.config, [])
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_pretrain_"))
    model_dir = work / "open_clip_model"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_config_dict(cfg.clip),
                                                                 "preprocess_cfg": {}}))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
    results: dict[str, list[dict]] = {"baton": [], "open_clip_train": []}
    for r in range(args.repeats):
        order = ("baton", "open_clip_train") if r % 2 == 0 else ("open_clip_train", "baton")
        for side in order:
            load = os.getloadavg()[0]
            if side == "baton":
                run_dir = work / f"baton_{r}"
                wall = run(side, baton_command(args, run_dir), env, work / f"baton_{r}.log")
                times = baton_step_times(run_dir, args.batch_size)
            else:
                logs = work / "open_clip_logs"
                wall = run(side, open_clip_command(args, cfg, model_dir, logs, f"run_{r}"), env,
                           work / f"open_clip_{r}.log")
                times = open_clip_step_times(logs / f"run_{r}" / "out.log")
            s = summarise(times, args.skip, args.batch_size, wall, (load, os.getloadavg()[0]))
            results[side].append(s)
            print(f"repeat {r} {side:16s} {s['samples_per_s']:7.1f} samples/s  ({s['measured_steps']} steps, "
                  f"mean {s['mean_step_s']:.3f} s, wall {wall:.0f} s, load {load:.1f} -> {s['load_after']:.1f})",
                  flush=True)

    med = {side: statistics.median(x["samples_per_s"] for x in runs) for side, runs in results.items()}
    best = {side: max(x["samples_per_s"] for x in runs) for side, runs in results.items()}
    pairs = [b["samples_per_s"] / o["samples_per_s"] for b, o in zip(results["baton"], results["open_clip_train"])]
    summary = {"machine": machine(), "args": vars(args), "runs": results, "median_samples_per_s": med,
               "best_samples_per_s": best, "ratio_of_medians": med["baton"] / med["open_clip_train"],
               "ratio_per_repeat": pairs}
    (work / "results.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: summary[k] for k in ("machine", "median_samples_per_s", "best_samples_per_s",
                                              "ratio_of_medians", "ratio_per_repeat")}, indent=2))
    print(f"results and logs: {work}")


if __name__ == "__main__":
    main()
