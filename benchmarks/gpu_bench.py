"""One part of the GPU runbook (`benchmarks/gpu.sh`), written to OUT/PART.json as it goes.

    python benchmarks/gpu_bench.py PART --out DIR/parts --work DIR/work [--smoke]

Parts: clip_synthetic, clip_compile (both: CLIP ViT-B/16 and B/32, bf16, ddp / fsdp / deepspeed
ZeRO-2, synthetic batches, train.compile off / on), clip_shards (the engine on JPEG shards through
baton's loader: workers decoding, and data.decode_on_device), open_clip_train (the same model,
batch and shards under open_clip's own trainer, side by side), dino (ViT-S/16 multi-crop bf16),
faiss (1M x 512 retrieval on GPU vs CPU), decode (JPEG decoding on the device vs one CPU core, and
the CPU decode cores one GPU needs at the measured step rate).

`--smoke`: the same code on the CPU with tiny models (gpu_common.TINY_CLIP / TINY_DINO), fp32,
10k x 32 faiss, in seconds: what tests/test_gpu_bench.py runs so that the runbook cannot rot.
Smoke compiles with dynamo's "eager" backend (tracing without inductor's C++ build).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import REPO, TINY_CLIP, PartResult, device, ensure_jpeg_shards, error_row, sync  # noqa: E402

PARTS = ("clip_synthetic", "clip_compile", "clip_shards", "open_clip_train", "dino", "faiss", "decode")


def shards_for(args) -> Path:
    n, size = (96, (64, 56)) if args.smoke else (4096, (256, 224))
    return ensure_jpeg_shards(Path(args.work), n, size)


def part_open_clip_train(result: PartResult, args, dev: torch.device) -> None:
    """benchmarks/pretrain_vs_open_clip.py's two commands, once each, on this device and precision."""
    import yaml

    import pretrain_vs_open_clip as vs
    from baton.config import load_config
    from pretrain.config import PretrainConfig

    work = Path(args.work) / "open_clip_train"
    work.mkdir(parents=True, exist_ok=True)
    config = REPO / "configs" / "clip_vit_b16.yaml"
    if args.smoke:   # the tiny CLIP as a recipe of its own (both programs read the model from it)
        config = work / "tiny_clip.yaml"
        recipe = yaml.safe_load((REPO / "configs" / "clip_vit_b16.yaml").read_text())
        recipe["clip"] = {"name": "tiny", "config": TINY_CLIP}
        config.write_text(yaml.safe_dump(recipe))
    batch, skip, measured = (8, 1, 4) if args.smoke else (256, 4, 8)
    ns = argparse.Namespace(config=str(config), shards=str(shards_for(args)), num_samples=batch * (skip + measured),
                            batch_size=batch, workers=1 if args.smoke else min(12, max(1, (os.cpu_count() or 2) - 2)),
                            threads=1 if args.smoke else 4, device=dev.type,
                            precision="fp32" if args.smoke else "bf16")
    cfg = load_config(PretrainConfig, ns.config, [])
    model_dir = work / "open_clip_model"
    model_dir.mkdir(exist_ok=True)
    from pretrain.clip.model import model_config_dict
    (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_config_dict(cfg.clip),
                                                                 "preprocess_cfg": {}}))
    env = {**os.environ, "OMP_NUM_THREADS": str(ns.threads), "PYTHONPATH": str(REPO)}
    rates = {}
    for side in ("baton", "open_clip_train"):
        base = {"program": side, "model": cfg.clip.name, "batch": batch, "precision": ns.precision,
                "workers": ns.workers, "data": "shards, workers decode"}
        try:
            if side == "baton":
                run_dir = work / "baton_run"
                wall = vs.run(side, vs.baton_command(ns, run_dir), env, work / "baton.log")
                times = vs.baton_step_times(run_dir, batch)
            else:
                wall = vs.run(side, vs.open_clip_command(ns, cfg, model_dir, work / "logs", "run"), env,
                              work / "open_clip_train.log")
                times = vs.open_clip_step_times(work / "logs" / "run" / "out.log")
            s = vs.summarise(times, skip, batch, wall, (os.getloadavg()[0], os.getloadavg()[0]))
            rates[side] = s["samples_per_s"]
            result.add({**base, "steps": s["measured_steps"], "step_s": s["mean_step_s"],
                        "samples_per_s": s["samples_per_s"], "wall_s": wall})
        except (Exception, SystemExit) as e:   # vs.run exits on a failed program: record it, go on
            result.add(error_row(base, e))
    if len(rates) == 2:
        result.set(baton_over_open_clip_train=rates["baton"] / rates["open_clip_train"])


def part_faiss(result: PartResult, args, dev: torch.device) -> None:
    """Exact inner-product search (IndexFlatIP) of nq queries among n x d unit vectors, CPU then GPU."""
    import faiss
    import numpy as np

    n, d, nq, k = (10_000, 32, 100, 10) if args.smoke else (1_000_000, 512, 1000, 10)
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((n, d), dtype=np.float32)
    xq = rng.standard_normal((nq, d), dtype=np.float32)
    faiss.normalize_L2(xb)
    faiss.normalize_L2(xq)
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    result.set(faiss_version=faiss.__version__, faiss_gpus=gpus)

    def timed(index, where):
        t0 = time.perf_counter()
        index.add(xb)
        added = time.perf_counter() - t0
        index.search(xq[:10], k)   # warm-up
        t0 = time.perf_counter()
        _, ids = index.search(xq, k)
        searched = time.perf_counter() - t0
        result.add({"index": "IndexFlatIP", "device": where, "n": n, "d": d, "nq": nq, "k": k, "add_s": added,
                    "search_s": searched, "queries_per_s": nq / searched})
        return ids

    cpu_ids = timed(faiss.IndexFlatIP(d), f"cpu ({faiss.omp_get_max_threads()} threads)")
    if not gpus:
        result.note("faiss has no GPU support here (faiss.get_num_gpus() == 0: the faiss-cpu wheel); "
                    "install faiss-gpu (pip install 'baton[gpu]') for the GPU row")
        return
    gpu_index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, faiss.IndexFlatIP(d))
    gpu_ids = timed(gpu_index, "gpu 0")
    result.set(top1_agreement=float((cpu_ids[:, 0] == gpu_ids[:, 0]).mean()))


def step_rate_of(parts: Path) -> tuple[float | None, str]:
    """The ViT-B/16 (smoke: tiny) ddp synthetic samples/s that clip_synthetic measured, if it did."""
    path = parts / "clip_synthetic.json"
    if path.is_file():
        for row in json.loads(path.read_text())["rows"]:
            if row.get("strategy") == "ddp" and row.get("model") in ("ViT-B-16", "tiny") and row.get("samples_per_s"):
                return row["samples_per_s"], f"{row['model']} ddp synthetic ({path.name})"
    from loader import PAPER_STEP_RATE
    return PAPER_STEP_RATE, "clip_synthetic did not run: ViT-B/16 at 50 % MFU of an H100, on paper"


def part_decode(result: PartResult, args, dev: torch.device) -> None:
    """CLIP's train transform on the shards' JPEGs: decoded and transformed on the device in batches
    (data.decode_on_device's code) vs PIL on one CPU core (the workers' code, one process)."""
    import io

    from PIL import Image

    from baton.images import rgb_on_white
    from loader import decode_cores_needed, load_images
    from pretrain.clip.model import build_transforms
    from pretrain.clip.config import AugmentConfig
    from pretrain.data.device_decode import DeviceImages
    from pretrain.data.uint8_images import split_normalize

    size = 32 if args.smoke else 224
    pp = {"image_size": size, "mean": [0.48145466, 0.4578275, 0.40821073],
          "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic"}
    transform = build_transforms(pp, AugmentConfig(scale=[0.9, 1.0], color_jitter_prob=0.0))[0]
    images = load_images(str(shards_for(args)))
    batch = 16 if args.smoke else 256
    n = min(len(images), 4 * batch)
    lengths = torch.tensor([len(x) for x in images[:n]])
    padded = torch.zeros(n, int(lengths.max()), dtype=torch.uint8)
    for i, data in enumerate(images[:n]):
        padded[i, :len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    seeds = torch.arange(n)
    on_device = DeviceImages(transform, dev)
    on_device((padded[:batch], lengths[:batch], seeds[:batch]))   # warm-up (nvJPEG handles, kernels)
    sync(dev)
    t0 = time.perf_counter()
    for s in range(0, n - batch + 1, batch):
        on_device((padded[s:s + batch], lengths[s:s + batch], seeds[s:s + batch]))
    sync(dev)
    device_rate = (n // batch * batch) / (time.perf_counter() - t0)
    to_uint8, _ = split_normalize(transform)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    for data in images[:n]:
        to_uint8(rgb_on_white(Image.open(io.BytesIO(data))))
    core_rate = n / (time.perf_counter() - t0)
    torch.set_num_threads(threads)
    step_rate, where = step_rate_of(Path(args.out))
    result.add({"what": f"CLIP train transform, {size} px, batch {batch}", "images": n,
                "device_decode_samples_per_s": device_rate, "cpu_decode_samples_per_s_per_core": core_rate,
                "step_samples_per_s": step_rate, "step_rate_from": where,
                "cpu_decode_cores_per_gpu": decode_cores_needed(step_rate, core_rate),
                "device_decode_share_of_step": step_rate / device_rate})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=PARTS)
    ap.add_argument("--out", required=True, help="folder of the parts' JSON files")
    ap.add_argument("--work", required=True, help="folder for shards and runs")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny models, seconds")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dev = device(args.smoke)
    if args.smoke:
        torch.set_num_threads(1)
        if args.part == "clip_compile":   # dynamo tracing without inductor's C++ build on a CPU
            import functools
            torch.nn.Module.compile = functools.partialmethod(torch.nn.Module.compile, backend="eager")
    result = PartResult(Path(args.out), args.part, args.smoke, dev)
    import gpu_clip

    if args.part in ("clip_synthetic", "clip_compile"):
        gpu_clip.run_synthetic(result, args, dev, compile_=args.part == "clip_compile")
    elif args.part == "clip_shards":
        gpu_clip.run_shards(result, args, dev, shards_for(args), Path(args.work))
    elif args.part == "dino":
        gpu_clip.run_dino(result, args, dev)
    else:
        {"open_clip_train": part_open_clip_train, "faiss": part_faiss, "decode": part_decode}[args.part](
            result, args, dev)
    result.set(finished=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
