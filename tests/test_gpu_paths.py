"""The GPU paths no CPU run exercises, each against its CPU or fp32 counterpart; skipped without
CUDA. benchmarks/gpu.sh runs this file first on a GPU (a few seconds each).

bf16 autocast (ddp), FSDP2's MixedPrecisionPolicy, DeepSpeed ZeRO-2 on nccl, the uint8 hand-off
normalised on the device, fp16 with a GradScaler, and data.decode_on_device on nvJPEG.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from baton.cli import main as cli_main
from baton.logs import read_metrics

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run(tmp_path, shards, name: str, *overrides: str) -> list[float]:
    """A few steps of the tiny CLIP on the GPU; its logged losses."""
    from test_pretrain import write_tiny_config

    run_dir = tmp_path / name
    cfg = write_tiny_config(tmp_path / f"{name}.yaml", run_dir, shards, data={"workers": 1},
                            train={"max_steps": 4, "checkpoint_every": 100, "device": "cuda"})
    assert cli_main(["pretrain", str(cfg), *overrides]) == 0
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def fp32_losses(tmp_path_factory, synthetic_shards):
    return run(tmp_path_factory.mktemp("fp32"), synthetic_shards, "fp32", "train.precision=fp32")


@pytest.mark.parametrize("strategy,precision", [("ddp", "bf16"), ("fsdp", "bf16"), ("deepspeed", "bf16"),
                                                ("ddp", "fp16"), ("fsdp", "fp16")])
def test_mixed_precision_follows_fp32(tmp_path, synthetic_shards, fp32_losses, strategy, precision):
    """bf16 autocast / FSDP2 MixedPrecisionPolicy / DeepSpeed bf16 / fp16 + GradScaler: the same
    batches give losses within half-precision error of fp32's; the sharded checkpoints export and
    an fp16 checkpoint holds its loss scaler."""
    from baton.checkpoint import load_checkpoint

    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")
    losses = run(tmp_path, synthetic_shards, "run", f"train.strategy={strategy}", f"train.precision={precision}")
    assert len(losses) == len(fp32_losses) == 4 and all(np.isfinite(losses))
    assert np.allclose(losses, fp32_losses, rtol=0.05), (losses, fp32_losses)
    if precision == "fp16":
        state, _ = load_checkpoint(tmp_path / "run")
        assert state["scaler"]["scale"] > 0
    if strategy != "ddp" and precision == "bf16":
        assert cli_main(["export", str(tmp_path / "run"), str(tmp_path / "export")]) == 0


def test_uint8_handoff_normalised_on_the_device_equals_the_workers_floats():
    """The GPU run's hand-off (auto: uint8 on CUDA) gives, bit for bit, what the workers' float path gives."""
    from pretrain.data.uint8_images import BatchNormalize, hands_over_uint8

    assert hands_over_uint8("auto", torch.device("cuda"))
    norm = BatchNormalize((0.48, 0.45, 0.40), (0.27, 0.26, 0.28))
    images = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8).permute(0, 3, 1, 2)   # PIL's HWC layout
    on_gpu = norm(images.cuda())
    in_workers = norm.in_place(images.contiguous().float())
    assert on_gpu.is_cuda and on_gpu.is_contiguous()
    assert torch.equal(on_gpu.cpu(), in_workers)


def test_training_on_gpu_with_uint8_handoff_follows_the_float_handoff(tmp_path, synthetic_shards):
    uint8 = run(tmp_path, synthetic_shards, "u8", "train.precision=fp32", "data.image_handoff=uint8")
    floats = run(tmp_path, synthetic_shards, "f32", "train.precision=fp32", "data.image_handoff=float")
    assert np.allclose(uint8, floats, rtol=1e-4), (uint8, floats)


def test_nvjpeg_decode_matches_the_cpu_decoder():
    from test_device_decode import photo

    from pretrain.data.device_decode import decode_jpegs

    rng = np.random.default_rng(0)
    datas = [photo(rng, 96, 80), photo(rng, 64, 72), photo(rng, mode="L")]
    lengths = torch.tensor([len(d) for d in datas])
    padded = torch.zeros(len(datas), int(lengths.max()), dtype=torch.uint8)
    for i, d in enumerate(datas):
        padded[i, :len(d)] = torch.frombuffer(bytearray(d), dtype=torch.uint8)
    on_gpu = decode_jpegs(padded, lengths, torch.device("cuda"))
    on_cpu = decode_jpegs(padded, lengths, torch.device("cpu"))
    for g, c in zip(on_gpu, on_cpu):
        assert g.is_cuda and g.shape == c.shape and g.dtype == torch.uint8
        assert (g.cpu().int() - c.int()).abs().float().mean() < 1.0


def test_training_with_decode_on_device_on_gpu_follows_the_workers(tmp_path):
    from test_device_decode import write_jpeg_shards

    shards = write_jpeg_shards(tmp_path / "jpegs")
    workers = run(tmp_path, shards, "workers", "train.precision=fp32")
    on_device = run(tmp_path, shards, "device", "train.precision=fp32", "data.decode_on_device=true")
    assert np.allclose(on_device, workers, rtol=5e-3), (on_device, workers)
