"""A training step of a backbone with torch's three Adam implementations, side by side in one run.

Why: on a CPU torch's Adam/AdamW default to the per-tensor Python loop (`foreach` is chosen on
CUDA only), about 8 % of a finetuning step of the demo's convnet on 2 cores; baton's loops
now ask for the fused kernel where every parameter allows it (`baton.run.fused_adam_kwargs`).
This measures, for one timm backbone and batch (bf16 autocast + channels-last, the demo's mode),
the optimiser step alone and a whole forward + backward + step, for `foreach=False` (torch's CPU
default), `foreach=True` and `fused=True`, interleaved in rounds so a shared machine's noise hits
each alike; it prints the medians and each one's speed relative to the default.

    python benchmarks/adam_cpu.py [--model small_convnet_w] [--batch-size 64] [--rounds 8] [--threads 2]
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from precision_step import step_arguments

IMPLEMENTATIONS = {"default (single tensor)": {"foreach": False}, "foreach": {"foreach": True},
                   "fused": {"fused": True}}


def main() -> None:
    a = step_arguments(__doc__.splitlines()[0])
    import timm

    from baton.run import to_channels_last

    runs = {}
    for name, kwargs in IMPLEMENTATIONS.items():
        torch.manual_seed(0)
        model = to_channels_last(timm.create_model(a.model, num_classes=0))
        x = to_channels_last(torch.randn(a.batch_size, 3, a.image_size, a.image_size))
        runs[name] = (model, x, torch.optim.Adam(model.parameters(), lr=1e-3, **kwargs))

    def step(name: str) -> float:
        """One whole step; returns the seconds of its optimiser step."""
        model, x, opt = runs[name]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        y.float().pow(2).mean().backward()
        t = time.perf_counter()
        opt.step()
        t = time.perf_counter() - t
        opt.zero_grad(set_to_none=True)
        return t

    whole: dict[str, list[float]] = {n: [] for n in runs}
    optim: dict[str, list[float]] = {n: [] for n in runs}
    for _ in range(a.rounds):
        for name in runs:
            step(name)   # warm-up after the others ran
            t, o = time.perf_counter(), 0.0
            for _ in range(a.steps):
                o += step(name)
            whole[name].append((time.perf_counter() - t) / a.steps)
            optim[name].append(o / a.steps)

    def med(v: list[float]) -> float:
        return statistics.median(v[1:] if len(v) > 1 else v)

    base = next(iter(runs))
    print(json.dumps({
        "model": a.model, "batch_size": a.batch_size, "threads": a.threads, "torch": torch.__version__,
        "parameters": sum(p.numel() for p in runs[base][0].parameters()),
        "seconds_per_step": {n: round(med(v), 4) for n, v in whole.items()},
        "seconds_per_optimiser_step": {n: round(med(v), 4) for n, v in optim.items()},
        "step_speed_vs_default": {n: round(med(whole[base]) / med(v), 2) for n, v in whole.items()},
    }, indent=1))


if __name__ == "__main__":
    main()
