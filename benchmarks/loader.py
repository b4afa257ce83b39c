"""Loader throughput: baton's loader vs a bare webdataset pipeline vs the decode limit, one run.

The loaders do the same work per sample: decode the PNG/JPEG with PIL, convert to RGB, resize
to SIZE x SIZE, to tensor, normalise (CLIP mean/std); captions go through the same trivial
tokenizer (tokenisation is not what is measured). Same shards, same worker count, same batch
size and shuffle buffer:

- baton:      `pretrain.data.make_loader` (epoch-exact and resampled), one epoch of N // B batches,
              set up as a CPU run sets it up (`data.image_handoff: auto`): the transform stops at a
              uint8 tensor and the workers normalise it into the batch (the float hand-off). The
              "uint8" row is a GPU run's: images handed over as uint8, the normalisation left to the
              device (not timed: read that row as what reaches a GPU);
- webdataset: wds.WebDataset(urls, shardshuffle, split_by_worker).shuffle().decode("pil")
              .to_tuple().map_tuple(ToTensor + Normalize transform).batched() in a DataLoader;
- decode limits: a plain loop over the same images (already in memory: no I/O, no IPC) in one
              process, its samples/s x workers (perfect scaling). Two of them: "decode+resize"
              only decodes and resizes (the issue's words; no tensors), "+normalise" runs the
              loaders' whole transform (decode, resize, ToTensor, Normalize).

Each is run `--repeats` times, interleaved; the best run counts (the machine may be shared).
The decode limits are also measured in `--workers` processes at once (the same loop in each),
which is what the cores can really give; the table reports both.

Two kinds of shards: the demo's emoji (`--shards`, tiny 64 px PNGs, where decoding is cheap and
any per-sample overhead shows) or `--photos N`: N synthetic photos (JPEG 512x384, smooth
gradients plus noise) written by `baton shards folder --max-side 256` into a temporary folder,
then loaded at `--size 224`, the img2dataset/CLIP case where decoding dominates.

With JPEG shards (`--photos`) a "JPEG bytes" row is the loader of `data.decode_on_device`: the
workers only check headers and hand the bytes over (the decoding, on the GPU, is not timed here).

CPU decode cores needed per GPU: a GPU that trains at R samples/s (`--step-rate R`, or the
ViT-B/16 ddp bf16 synthetic rate of `--gpu-json runs/gpu/gpu.json`, what benchmarks/gpu.sh
measured) needs R / (one core's decode rate) cores decoding for the workers' path; printed for
both decode limits (one process each: samples/s per core).

    python benchmarks/loader.py [--shards data/emoji/train] [--workers 2] [--batch-size 64]
    python benchmarks/loader.py --photos 4000 --size 224 [--step-rate 4000 | --gpu-json runs/gpu/gpu.json]
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import platform
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from baton.images import rgb_on_white  # noqa: E402
from pretrain.config import DataConfig  # noqa: E402
from pretrain.data import SampleToPair, make_loader, resolve_sources, steps_per_epoch  # noqa: E402
from pretrain.data.device_decode import EncodedJpegToPair, max_encoded_bytes  # noqa: E402
from pretrain.data.uint8_images import split_normalize  # noqa: E402

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


def tokenize(texts):
    return torch.zeros(len(texts), 16, dtype=torch.long)


def make_transform(size: int):
    return transforms.Compose([transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC),
                               transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def run_baton(shards: str, mode: str, workers: int, batch: int, buffer: int, size: int,
              handoff: str = "float") -> tuple[int, float]:
    """handoff "float": the workers normalise (a CPU run's `data.image_handoff: auto`, as
    pretrain.clip.method sets it up); "uint8": they hand over uint8 images and the normalisation is
    left to the device (a GPU run's), not timed here; "jpeg": `data.decode_on_device`'s bytes."""
    sources = resolve_sources(shards)
    dcfg = DataConfig(train_shards=shards, mode=mode, workers=workers, batch_size=batch, shuffle_buffer=buffer)
    steps = steps_per_epoch(sources.num_samples, batch, 1)
    transform, normalize = split_normalize(make_transform(size))
    to_pair = SampleToPair(transform, tokenize, "txt", row_normalize=normalize if handoff == "float" else None)
    if handoff == "jpeg":
        to_pair = EncodedJpegToPair(tokenize, "txt", max_encoded_bytes(None, size))
    start, n = time.perf_counter(), 0
    for images, *_ in make_loader(sources, dcfg, to_pair, seed=0, epoch=0, rank=0, steps=steps):
        n += images.shape[0]
    return n, time.perf_counter() - start


def run_webdataset(shards: str, workers: int, batch: int, buffer: int, size: int) -> tuple[int, float]:
    urls = resolve_sources(shards).urls
    transform = make_transform(size)
    dataset = (wds.WebDataset(urls, shardshuffle=len(urls), nodesplitter=wds.single_node_only,
                              workersplitter=wds.split_by_worker, seed=0)
               .shuffle(buffer).decode("pil").to_tuple("png;jpg;jpeg;webp", "txt")
               .map_tuple(transform, lambda t: tokenize([t])[0]).batched(batch, partial=False))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                         prefetch_factor=4 if workers else None)
    start, n = time.perf_counter(), 0
    for images, _ in loader:
        n += images.shape[0]
    return n, time.perf_counter() - start


def load_images(shards: str) -> list[bytes]:
    out = []
    for url in resolve_sources(shards).urls:
        with tarfile.open(url) as t:
            out += [t.extractfile(m).read() for m in t.getmembers() if m.name.lower().endswith(IMAGE_EXTS)]
    return out


def run_decode_limit(images: list[bytes], size: int, normalise: bool) -> tuple[int, float]:
    """A plain loop over the images: decode and resize only (the transform's first step, the same
    PIL resize), or with `normalise` the loaders' whole transform (+ ToTensor + Normalize)."""
    transform = make_transform(size) if normalise else make_transform(size).transforms[0]
    start = time.perf_counter()
    for data in images:
        transform(rgb_on_white(Image.open(io.BytesIO(data))))   # what the loader's decode_image does
    return len(images), time.perf_counter() - start


def _decode_limit_worker(args: tuple[list[bytes], int, bool]) -> tuple[int, float]:
    torch.set_num_threads(1)
    return run_decode_limit(*args)


def run_decode_limit_parallel(images: list[bytes], size: int, normalise: bool, workers: int) -> tuple[int, float]:
    """The decode-limit loop in `workers` processes at once (forked, so the images are shared): wall time."""
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.map(_decode_limit_worker, [([], size, normalise)] * workers)  # processes up before the clock starts
        start = time.perf_counter()
        done = pool.map(_decode_limit_worker, [(images, size, normalise)] * workers)
        return sum(n for n, _ in done), time.perf_counter() - start


def write_photo_shards(root: Path, n: int) -> str:
    """N synthetic 512x384 JPEG photos written as shards by `baton shards folder --max-side 256`."""
    from baton.cli import main as baton_main
    from shard_write import make_photos

    make_photos(root / "photos", n, (512, 384))
    rc = baton_main(["shards", "folder", str(root / "photos"), "--out", str(root / "shards"), "--workers", "2",
                     "--shard-size", "250", "--max-side", "256", "--jpeg-quality", "90"])
    if rc != 0:
        raise SystemExit(rc)
    shutil.rmtree(root / "photos")
    return str(root / "shards")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", default="data/emoji/train")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--shuffle-buffer", type=int, default=500)
    ap.add_argument("--size", type=int, default=64, help="resize target (px)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--photos", type=int, default=0, metavar="N",
                    help="instead of --shards: N synthetic JPEG photos written as shards (max side 256)")
    ap.add_argument("--step-rate", type=float, default=None, metavar="R",
                    help="samples/s one GPU trains at: print the CPU decode cores it needs")
    ap.add_argument("--gpu-json", default=None, help="benchmarks/gpu.sh's gpu.json: its ViT-B-16 ddp rate as --step-rate")
    args = ap.parse_args()
    if args.photos:
        tmp = Path(tempfile.mkdtemp(prefix="baton-loader-bench-"))
        try:
            args.shards = write_photo_shards(tmp, args.photos)
            return benchmark(args)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if not Path(args.shards).exists():
        print(f"no shards at {args.shards}: run `baton shards emoji --out data/emoji` (or make demo) first")
        return 2
    return benchmark(args)


LIMITS = {"decode+resize": False, "+normalise": True}   # name -> run_decode_limit's `normalise`


def benchmark(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    images = load_images(args.shards)
    common = (args.workers, args.batch_size, args.shuffle_buffer, args.size)
    runs = {"baton epoch_exact": lambda: run_baton(args.shards, "epoch_exact", *common),
            "baton resampled": lambda: run_baton(args.shards, "resampled", *common),
            "baton epoch_exact, uint8": lambda: run_baton(args.shards, "epoch_exact", *common, handoff="uint8"),
            "bare webdataset": lambda: run_webdataset(args.shards, *common)}
    if images and all(data[:3] == b"\xff\xd8\xff" for data in images[:50]):   # JPEG shards
        runs["baton, JPEG bytes"] = lambda: run_baton(args.shards, "epoch_exact", *common, handoff="jpeg")
    for name, normalise in LIMITS.items():
        runs[f"{name} (1 process)"] = lambda n=normalise: run_decode_limit(images, args.size, n)
        runs[f"{name} ({args.workers} at once)"] = \
            lambda n=normalise: run_decode_limit_parallel(images, args.size, n, args.workers)
    best: dict[str, float] = {}
    for r in range(args.repeats):
        for name, fn in runs.items():
            n, seconds = fn()
            rate = n / seconds
            best[name] = max(best.get(name, 0.0), rate)
            print(f"  run {r + 1} {name:<30} {n:>6} samples {seconds:6.2f} s {rate:8.1f} samples/s", flush=True)
    limits, per_core = {}, {}
    for name in LIMITS:
        per_core[name] = best[f"{name} (1 process)"]
        limits[f"{name} x{args.workers}"] = best.pop(f"{name} (1 process)") * args.workers
        limits[f"{name} {args.workers} at once"] = best.pop(f"{name} ({args.workers} at once)")
    print(f"\n{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread, "
          f"{args.workers} workers, batch {args.batch_size}, {len(images)} images -> {args.size}px, best of "
          f"{args.repeats}. Decode limits: decode+resize only (the issue's), +normalise (the loaders' whole "
          f"transform); x{args.workers}: one process's rate x workers; at once: {args.workers} processes run.")
    print(f"{'loader':<26} {'samples/s':>10} {'vs webdataset':>14}" + "".join(f" {'vs ' + k:>27}" for k in limits))
    for name, rate in [*best.items(), *limits.items()]:
        print(f"{name:<26} {rate:>10.1f} {rate / best['bare webdataset']:>13.2f}x"
              + "".join(f" {rate / v:>26.2f}x" for v in limits.values()))
    step_rate, where = measured_step_rate(args)
    print(f"\nCPU decode cores needed per GPU at {step_rate:.0f} samples/s ({where}): "
          + ", ".join(f"{name} {decode_cores_needed(step_rate, rate):.1f} cores ({rate:.0f} samples/s a core)"
                      for name, rate in per_core.items()))
    return 0


PAPER_STEP_RATE = 4000.0   # CLIP ViT-B/16 at 50 % MFU of an H100 (issue 20's estimate)


def decode_cores_needed(step_rate: float, per_core: float) -> float:
    """Cores of decoding that keep one GPU fed: its step's samples/s over one core's decode samples/s."""
    return step_rate / per_core


def measured_step_rate(args: argparse.Namespace) -> tuple[float, str]:
    """(samples/s of one GPU's step, where the figure comes from)."""
    if args.step_rate:
        return args.step_rate, "--step-rate"
    if args.gpu_json:
        import json

        for row in json.loads(Path(args.gpu_json).read_text()).get("parts", {}).get("clip_synthetic", {}).get("rows", []):
            if row.get("model") == "ViT-B-16" and row.get("strategy") == "ddp" and row.get("samples_per_s"):
                return row["samples_per_s"], f"ViT-B-16 ddp in {args.gpu_json}"
    return PAPER_STEP_RATE, "no measured rate given: ViT-B/16 at 50 % MFU of an H100, on paper"


if __name__ == "__main__":
    sys.exit(main())
