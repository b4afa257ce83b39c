"""data.decode_on_device: JPEG bytes decoded and transformed in the training process give what the
workers' PIL path gives (shape, dtype, range, values within a few levels), on the CPU through the
same function the GPU uses; the key takes effect in training or is refused."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from baton.errors import BatonError
from pretrain.clip.config import AugmentConfig
from pretrain.data import Rejected, SampleToPair
from pretrain.data.device_decode import DeviceImages, EncodedJpegToPair, decode_jpegs, max_encoded_bytes
from pretrain.data.uint8_images import BatchNormalize, split_normalize

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
PP = {"image_size": 32, "mean": list(MEAN), "std": list(STD), "interpolation": "bicubic"}


def photo(rng: np.random.Generator, w: int = 80, h: int = 64, mode: str = "RGB") -> bytes:
    """A smooth gradient with noise, as JPEG (quality 90): what photo shards hold."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a, b, c = rng.uniform(60, 255, 3)
    img = np.stack([a * xx / w, b * yy / h, c * (xx + yy) / (w + h)], axis=-1) + rng.normal(0, 8, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).convert(mode).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def tokenize(texts):
    return torch.zeros(len(texts), 4, dtype=torch.long)


def sample(data: bytes, key: str = "k", ext: str = "jpg") -> dict:
    return {"__key__": key, "__url__": "mem", ext: data, "txt": b"a photo"}


def both_paths(transform, samples: list[dict], seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(CPU path's normalised batch, device path's normalised batch) for the same samples and seeds."""
    to_uint8, normalize = split_normalize(transform)
    cpu_rows = [SampleToPair(to_uint8, tokenize, "txt")(s, seed)[0] for s, seed in zip(samples, seeds)]
    cpu = normalize(torch.stack(cpu_rows))
    encode = EncodedJpegToPair(tokenize, "txt", max_encoded_bytes(None, 32))
    rows = [encode(s, seed) for s, seed in zip(samples, seeds)]
    batch = tuple(torch.stack(column) for column in zip(*rows))
    images, tokens = DeviceImages(transform, torch.device("cpu"))(batch)
    assert images.dtype == torch.uint8 and torch.equal(tokens, batch[3])
    return cpu, normalize(images)


def assert_close_pixels(cpu: torch.Tensor, dev: torch.Tensor, max_levels: float, mean_levels: float) -> None:
    assert dev.shape == cpu.shape and dev.dtype == cpu.dtype == torch.float32
    std = torch.tensor(STD).view(1, 3, 1, 1)
    levels = ((dev - cpu) * std * 255).abs()     # back to 0..255 pixel levels
    assert levels.max() <= max_levels, levels.max()
    assert levels.mean() <= mean_levels, levels.mean()
    lo = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    hi = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    for x in (cpu, dev):   # the same value range: normalised 0..255
        assert (x.amin(dim=(0, 2, 3)) >= lo - 1e-5).all() and (x.amax(dim=(0, 2, 3)) <= hi + 1e-5).all()


def test_torchvision_decodes_jpegs_as_pil_does():
    rng = np.random.default_rng(0)
    datas = [photo(rng), photo(rng, 50, 70), photo(rng, mode="L")]
    lengths = torch.tensor([len(d) for d in datas])
    padded = torch.zeros(len(datas), int(lengths.max()) + 10, dtype=torch.uint8)
    for i, d in enumerate(datas):
        padded[i, :len(d)] = torch.frombuffer(bytearray(d), dtype=torch.uint8)
    decoded = decode_jpegs(padded, lengths, torch.device("cpu"))
    for d, got in zip(datas, decoded):
        want = torch.from_numpy(np.array(Image.open(io.BytesIO(d)).convert("RGB"))).permute(2, 0, 1)
        assert got.shape == want.shape and got.dtype == torch.uint8
        assert (got.int() - want.int()).abs().max() <= 2


def test_eval_transform_on_device_matches_the_cpu_path():
    """Deterministic resize + centre crop: the same shape and range, values within a few levels."""
    from pretrain.clip.model import build_transforms

    rng = np.random.default_rng(1)
    samples = [sample(photo(rng, 80 + 8 * i, 64 + 4 * i), f"k{i}") for i in range(6)]
    cpu, dev = both_paths(build_transforms(PP, AugmentConfig())[1], samples, list(range(6)))
    assert cpu.shape == (6, 3, 32, 32)
    assert_close_pixels(cpu, dev, max_levels=12, mean_levels=1.0)


def test_train_transform_draws_the_same_crops_as_the_cpu_path():
    """RandomResizedCrop + colour jitter + grayscale from the per-sample seed: the same boxes and
    draws (a different box would differ by tens of levels on these gradients)."""
    from pretrain.clip.model import build_transforms

    rng = np.random.default_rng(2)
    augment = AugmentConfig(scale=[0.3, 1.0], color_jitter_prob=0.0, gray_scale_prob=0.5)
    samples = [sample(photo(rng), f"k{i}") for i in range(8)]
    cpu, dev = both_paths(build_transforms(PP, augment)[0], samples, [11 * i + 3 for i in range(8)])
    assert_close_pixels(cpu, dev, max_levels=16, mean_levels=1.5)
    other_seeds = both_paths(build_transforms(PP, augment)[0], samples, [11 * i + 4 for i in range(8)])[1]
    assert ((other_seeds - cpu) * torch.tensor(STD).view(1, 3, 1, 1) * 255).abs().mean() > 5


def test_worker_side_skips_what_it_cannot_hand_over():
    encode = EncodedJpegToPair(tokenize, "txt", max_bytes=4096)
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    with pytest.raises(Rejected) as r:
        encode(sample(png.getvalue(), ext="png"), 0)
    assert r.value.reason == "not_jpeg" and "decode_on_device" in r.value.detail
    big = photo(np.random.default_rng(3), 256, 256)
    assert len(big) > 4096
    with pytest.raises(Rejected) as r:
        encode(sample(big), 0)
    assert r.value.reason == "too_many_bytes"
    with pytest.raises(Rejected) as r:
        encode({"__key__": "k", "__url__": "mem", "jpg": photo(np.random.default_rng(4))}, 0)
    assert r.value.reason == "missing_caption"
    row, n, seed, _ = encode(sample(photo(np.random.default_rng(5))), 77)
    assert row.shape == (4096,) and int(seed) == 77 and 0 < int(n) <= 4096


def test_a_corrupt_jpeg_is_named():
    good = photo(np.random.default_rng(6))
    bad = good[:200] + bytes(len(good) - 200)
    lengths = torch.tensor([len(good), len(bad)])
    padded = torch.zeros(2, len(good), dtype=torch.uint8)
    padded[0] = torch.frombuffer(bytearray(good), dtype=torch.uint8)
    padded[1] = torch.frombuffer(bytearray(bad), dtype=torch.uint8)
    with pytest.raises(BatonError, match="sample b0rk"):
        decode_jpegs(padded, lengths, torch.device("cpu"), ["fine", "b0rk"])


def write_jpeg_shards(out: Path, n: int = 48, shard_size: int = 16) -> Path:
    import webdataset as wds

    rng = np.random.default_rng(7)
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(0, n, shard_size):
        name = f"shard-{s // shard_size:06d}.tar"
        with wds.TarWriter(str(out / name)) as w:
            for i in range(s, min(n, s + shard_size)):
                w.write({"__key__": f"s{i:04d}", "jpg": photo(rng, 48, 40), "txt": f"photo number {i % 7}"})
        shards.append({"name": name, "count": min(shard_size, n - s)})
    (out / "stats.json").write_text(json.dumps({"num_samples": n, "shards": shards}))
    return out


def test_training_with_decode_on_device_follows_the_cpu_path(tmp_path):
    """Two steps on the same JPEG shards, decoded in the workers or in the training process: the
    same samples and crops, so the losses agree closely (not exactly: the resampling differs)."""
    from baton.cli import main as cli_main
    from baton.logs import read_metrics
    from test_pretrain import write_tiny_config

    shards = write_jpeg_shards(tmp_path / "jpegs")
    losses = {}
    for on_device in (False, True):
        run = tmp_path / f"run_{on_device}"
        cfg = write_tiny_config(tmp_path / "c.yaml", run, shards, data={"workers": 1},
                                train={"max_steps": 3, "checkpoint_every": 100})
        assert cli_main(["pretrain", str(cfg), f"data.decode_on_device={str(on_device).lower()}"]) == 0
        losses[on_device] = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert len(losses[True]) == 3
    assert np.allclose(losses[True], losses[False], rtol=2e-3, atol=0), losses


def test_decode_on_device_is_refused_where_it_cannot_take_effect(tmp_path, synthetic_shards, capsys):
    from baton.cli import main as cli_main
    from test_pretrain import write_tiny_config

    cfg = write_tiny_config(tmp_path / "c.yaml", tmp_path / "run", synthetic_shards)
    assert cli_main(["pretrain", str(cfg), "data.decode_on_device=true", "data.image_handoff=float"]) != 0
    assert "data.image_handoff=float" in capsys.readouterr().err
    assert cli_main(["pretrain", "configs/dino_demo.yaml", f"data.train_shards={synthetic_shards}",
                     f"run_dir={tmp_path}/dino", "train.device=cpu", "data.decode_on_device=true"]) != 0
    assert "method clip only" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "dino" / "checkpoints").exists()
