"""Shared test fixtures: small synthetic image-text shards made with webdataset's own writer,
independent of data_prep (so stage tests do not depend on each other)."""

from __future__ import annotations

import io
import json
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle", "cross")


def draw_shape(shape: str, color: tuple[int, int, int], size: int, rng: np.random.Generator) -> "Image.Image":
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    m = int(rng.integers(2, size // 6 + 3))
    box = (m, m, size - 1 - m, size - 1 - m)
    if shape == "circle":
        d.ellipse(box, fill=color)
    elif shape == "square":
        d.rectangle(box, fill=color)
    elif shape == "triangle":
        d.polygon([(size // 2, m), (m, size - 1 - m), (size - 1 - m, size - 1 - m)], fill=color)
    else:
        w = size // 6
        d.rectangle((size // 2 - w, m, size // 2 + w, size - 1 - m), fill=color)
        d.rectangle((m, size // 2 - w, size - 1 - m, size // 2 + w), fill=color)
    return img


def make_synthetic_shards(out_dir: Path, per_class: int = 4, shard_size: int = 16, size: int = 32,
                          seed: int = 0) -> dict:
    """16 classes (colour x shape), `per_class` images each; returns the stats dict it wrote."""
    import webdataset as wds

    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = []
    for color, rgb in COLORS.items():
        for shape in SHAPES:
            for i in range(per_class):
                img = draw_shape(shape, rgb, size, rng)
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                name = f"{color} {shape}"
                samples.append({"__key__": f"{color}_{shape}_{i:03d}", "png": buf.getvalue(),
                                "txt": f"a {name}",
                                "json": json.dumps({"class": name, "design": f"synthetic{i}",
                                                    "captions": [name, f"{shape} in {color}"]})})
    order = rng.permutation(len(samples))
    shards = []
    for s in range(0, len(samples), shard_size):
        name = f"shard-{s // shard_size:06d}.tar"
        chunk = [samples[j] for j in order[s:s + shard_size]]
        with wds.TarWriter(str(out_dir / name)) as w:
            for smp in chunk:
                w.write(smp)
        shards.append({"name": name, "count": len(chunk)})
    stats = {"num_samples": len(samples), "written": len(samples), "skipped": {}, "shards": shards}
    (out_dir / "stats.json").write_text(json.dumps(stats))
    return stats


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> Path:
    """A directory of 4 shards x 16 samples of 16 colour/shape classes (32x32 PNG)."""
    d = tmp_path_factory.mktemp("synthetic_shards")
    make_synthetic_shards(d)
    return d


def descendant_pids(pid: int) -> set[int]:
    """Every live descendant of `pid` (from /proc): the workers a killed parent must not leave behind."""
    kids = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                kids |= {int(d.name)} | descendant_pids(int(d.name))
    return kids


@contextmanager
def interrupted_after(module, name: str, calls: int):
    """`module.name` raises KeyboardInterrupt on call number calls + 1 (a training loop stopped
    after `calls` steps, e.g. through its per-step lr_factor), restored afterwards."""
    real, seen = getattr(module, name), {"n": 0}

    def counting(*a, **kw):
        seen["n"] += 1
        if seen["n"] > calls:
            raise KeyboardInterrupt
        return real(*a, **kw)

    setattr(module, name, counting)
    try:
        yield
    finally:
        setattr(module, name, real)
