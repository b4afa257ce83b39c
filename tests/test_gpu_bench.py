"""benchmarks/gpu.sh --smoke: the GPU runbook's own code on the CPU with tiny models, so that it
cannot rot before a GPU runs it. Every part must finish with rows of numbers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLIP_KEYS = ("samples_per_s", "step_s", "peak_memory_bytes", "flops_per_sample", "achieved_tflops")


def number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_gpu_runbook_smoke(tmp_path):
    """Each part is a fresh process (minutes on a loaded 2-core box, mostly imports); the limits
    are scaled up (GPU_SH_SCALE) so that a loaded CI box does not cut parts short."""
    out = tmp_path / "gpu"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "GPU_SH_SCALE": "4"}
    proc = subprocess.run(["bash", "benchmarks/gpu.sh", "--smoke", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=2900)
    assert (out / "gpu.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu.json").read_text())
    assert report["complete"], report["problems"]
    assert proc.returncode == 0
    parts = report["parts"]
    assert set(parts) == {"tests", "clip_synthetic", "clip_compile", "clip_shards", "open_clip_train", "dino",
                          "faiss", "decode"}
    assert parts["tests"]["tests"]["tests"] >= 5 and not parts["tests"]["tests"]["failed"]
    for name in ("clip_synthetic", "clip_compile", "clip_shards", "dino"):
        rows = parts[name]["rows"]
        for r in rows:
            assert all(number(r[k]) for k in CLIP_KEYS), (name, r)
            assert r["mfu"] is None and parts[name]["peak_tflops"] is None   # a CPU: no peak, no MFU
        if name.startswith("clip"):
            assert {r["strategy"] for r in rows} == {"ddp", "fsdp", "deepspeed"}, name
    assert {r["compile"] for r in parts["clip_compile"]["rows"]} == {True}
    assert any("decode_on_device" in r["data"] for r in parts["clip_shards"]["rows"])
    assert {r["program"] for r in parts["open_clip_train"]["rows"]} == {"baton", "open_clip_train"}
    assert number(parts["open_clip_train"]["baton_over_open_clip_train"])
    faiss_rows = parts["faiss"]["rows"]
    assert faiss_rows and all(number(r["queries_per_s"]) for r in faiss_rows)
    assert parts["faiss"]["faiss_gpus"] > 0 or any("no GPU support" in n for n in parts["faiss"]["notes"])
    decode = parts["decode"]["rows"][0]
    assert all(number(decode[k]) for k in ("device_decode_samples_per_s", "cpu_decode_samples_per_s_per_core",
                                           "cpu_decode_cores_per_gpu"))
    # the step rate is the one clip_synthetic measured, and the cores follow from it
    ddp = next(r for r in parts["clip_synthetic"]["rows"] if r["strategy"] == "ddp")
    assert decode["step_samples_per_s"] == ddp["samples_per_s"]
    assert math.isclose(decode["cpu_decode_cores_per_gpu"],
                        ddp["samples_per_s"] / decode["cpu_decode_samples_per_s_per_core"])
    md = (out / "gpu.md").read_text()
    assert "| tiny | deepspeed | synthetic | off |" in md and "baton / open_clip_train:" in md
