"""What the parts of `benchmarks/gpu.sh` share: the device and its peak FLOP/s, FLOP counting, peak
memory, the part's JSON (rewritten after every row, so a part cut by its time limit keeps the rows
it finished), the tiny smoke models and the synthetic JPEG shards.

FLOPs: `torch.utils.flop_counter.FlopCounterMode` over one forward + backward of the model and its
loss on a small batch, divided by the batch (matrix multiplications, convolutions and attention;
elementwise ops are not counted, nothing is recomputed). MFU = those FLOPs per sample x samples/s
/ the device's dense bf16 peak (PEAK_TFLOPS, by device name; unknown devices and CPUs: no MFU).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for p in (str(REPO), str(REPO / "benchmarks")):
    if p not in sys.path:
        sys.path.insert(0, p)

# Dense bf16 tensor-core peak, TFLOP/s (vendor data sheets, SXM parts unless named); matched in order.
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("GH200", 989.0), ("H200", 989.0), ("H100", 989.0), ("H800", 989.0),
               ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0),
               ("A10", 125.0)]

# The smoke run's tiny CLIP (as tests/test_pretrain.py's) and tiny DINO ViT: seconds on a CPU.
TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
TINY_DINO = {"dino.backbone": "vit_tiny_patch16_224",
             "dino.backbone_kwargs": "{img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2, "
                                     "dynamic_img_size: true}",
             "dino.global_crop_size": "32", "dino.local_crop_size": "16", "dino.n_local_crops": "2",
             "dino.out_dim": "64", "dino.hidden_dim": "32", "dino.bottleneck_dim": "16"}


def device(smoke: bool) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def peak_tflops(dev: torch.device) -> tuple[float | None, str]:
    """(dense bf16 peak TFLOP/s, where it comes from) of the device; None where unknown (CPUs)."""
    if dev.type != "cuda":
        return None, "no peak table for CPUs: no MFU"
    name = device_name(dev)
    for key, tflops in PEAK_TFLOPS:
        if key in name:
            return tflops, f"data-sheet dense bf16 peak for '{key}' ({name})"
    return None, f"device '{name}' is not in benchmarks/gpu_common.py PEAK_TFLOPS: no MFU"


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def reset_peak_memory(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def peak_memory(dev: torch.device) -> tuple[int, str]:
    """(bytes, what they are): torch.cuda.max_memory_allocated since the last reset on a GPU; the
    process's peak resident set on a CPU (since it started: an upper bound)."""
    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev)), "torch.cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS (CPU, since start)"


def count_flops(step) -> float:
    """FLOPs of `step()` (a forward + backward) as FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def with_mfu(row: dict, dev: torch.device) -> dict:
    """Add tflops (achieved) and mfu (of the device's peak) to a row with flops_per_sample and samples_per_s."""
    peak, _ = peak_tflops(dev)
    achieved = row["flops_per_sample"] * row["samples_per_s"] / 1e12
    return {**row, "achieved_tflops": achieved, "mfu": achieved / peak if peak else None}


class PartResult:
    """A part's JSON file: {part, device, rows, notes, ...}, written again after every change."""

    def __init__(self, out: Path, part: str, smoke: bool, dev: torch.device):
        self.path = Path(out) / f"{part}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        peak, source = peak_tflops(dev)
        self.data = {"part": part, "smoke": smoke, "device": device_name(dev), "device_type": dev.type,
                     "peak_tflops": peak, "peak_source": source, "torch": torch.__version__,
                     "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "rows": [], "notes": []}
        self.write()

    def add(self, row: dict) -> None:
        self.data["rows"].append(row)
        self.write()
        print(json.dumps(row), flush=True)

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self.write()

    def set(self, **values) -> None:
        self.data.update(values)
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        tmp.replace(self.path)


def ensure_jpeg_shards(work: Path, n: int, size: tuple[int, int]) -> Path:
    """N synthetic photos (JPEG, W x H) written as shards by `baton shards folder` into WORK/shards
    (once: later parts reuse them)."""
    import shutil

    shards = Path(work) / "shards"
    if (shards / "stats.json").is_file():
        return shards
    from baton.cli import main as baton_main
    from shard_write import make_photos

    photos = Path(work) / "photos"
    make_photos(photos, n, size)
    rc = baton_main(["shards", "folder", str(photos), "--out", str(shards), "--workers", "4",
                     "--shard-size", str(max(16, n // 64)), "--max-side", str(max(size)), "--jpeg-quality", "90"])
    if rc != 0:
        raise SystemExit(f"baton shards folder failed ({rc})")
    shutil.rmtree(photos, ignore_errors=True)
    return shards


def error_row(base: dict, e: BaseException) -> dict:
    return {**base, "error": f"{type(e).__name__}: {str(e).strip()[:500]}"}


def free(dev: torch.device) -> None:
    import gc

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
