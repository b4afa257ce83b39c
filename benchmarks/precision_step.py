"""Training-step time of a backbone by precision and memory layout, side by side in one run.

Why: `train.precision=bf16` and `train.channels_last=true` are what let the demo's recipes afford
a wider image tower and three times the finetuning steps on 2 CPU cores, but they pay only on
CPUs with bf16 matrix units (AVX512-BF16, AMX) and for convolutions. This measures, for one timm
backbone and batch size, a forward + backward + Adam step in four modes (fp32 / bf16 autocast, each
in the default and the channels-last layout), interleaved in rounds so a shared machine's noise
hits every mode alike; it prints the median seconds a step and each mode's speed relative to fp32.

    python benchmarks/precision_step.py [--model small_convnet_w] [--batch-size 64] [--rounds 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

MODES = ("fp32", "bf16", "fp32+channels_last", "bf16+channels_last")


def step_arguments(description: str) -> argparse.Namespace:
    """The command line of a step benchmark (this one and benchmarks/adam_cpu.py), parsed; torch's
    thread count set and baton's timm backbones registered."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default="small_convnet_w")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="steps timed per variant and round")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    from pretrain.models import register_timm_models

    register_timm_models()
    torch.set_num_threads(a.threads)
    return a


def main() -> None:
    a = step_arguments(__doc__.splitlines()[0])
    import timm

    from baton.run import to_channels_last
    runs = {}
    for mode in MODES:
        torch.manual_seed(0)
        model = timm.create_model(a.model, num_classes=0)
        x = torch.randn(a.batch_size, 3, a.image_size, a.image_size)
        if "channels_last" in mode:
            model, x = to_channels_last(model), to_channels_last(x)
        runs[mode] = (model, x, torch.optim.Adam(model.parameters()), mode.startswith("bf16"))

    def step(mode: str) -> None:
        model, x, opt, bf16 = runs[mode]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = model(x)
        y.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(a.rounds):
        for mode in MODES:
            step(mode)   # warm-up of this mode's kernels after the others ran
            t = time.perf_counter()
            for _ in range(a.steps):
                step(mode)
            times[mode].append((time.perf_counter() - t) / a.steps)
    med = {m: statistics.median(v[1:] if len(v) > 1 else v) for m, v in times.items()}
    print(json.dumps({"model": a.model, "batch_size": a.batch_size, "threads": a.threads,
                      "avx512_bf16": bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: None)()),
                      "amx": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: None)()),
                      "seconds_per_step": {m: round(v, 4) for m, v in med.items()},
                      "speed_vs_fp32": {m: round(med["fp32"] / v, 2) for m, v in med.items()}}, indent=1))


if __name__ == "__main__":
    main()
