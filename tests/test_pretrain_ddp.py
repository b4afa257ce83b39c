"""Two-rank DDP on CPU (gloo), in one torchrun launch (imports cost seconds per process):

1. one CLIP step in float64: the DDP gradients (ClipLoss with local logits and gathered features)
   equal the single-process gradients of the full batch;
2. `baton pretrain` under DDP with more workers than shards (2 ranks x 3 workers > 4 shards)
   runs its steps on both ranks, without hanging, and writes a checkpoint.

Pytest runs `test_ddp`; torchrun runs this file as a script (`_worker`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ddp(tmp_path, synthetic_shards):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, str(tmp_path), str(synthetic_shards)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["num_params_compared"] > 10
    assert result["max_grad_diff"] < 1e-10, result
    assert result["max_grad_abs"] > 1e-4  # the gradients compared are not trivially zero

    from baton.checkpoint import load_checkpoint
    from baton.logs import read_metrics

    state, _ = load_checkpoint(tmp_path / "run")
    assert state["step"] == 4  # 64 samples // (8 per rank x 2 ranks)
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 4]


def _gradient_check(out: Path) -> None:
    import torch
    from torch import nn

    from baton.distributed import DistInfo, init_distributed
    from pretrain.clip.model import build_clip
    from pretrain.config import ModelConfig
    from pretrain.train import forward_loss, make_loss
    from test_pretrain import TINY_MODEL

    info = init_distributed("cpu")
    torch.manual_seed(0)
    model = build_clip(ModelConfig(**TINY_MODEL)).double()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 32, 32, generator=g, dtype=torch.float64)
    texts = torch.randint(1, 1000, (8, 16), generator=g)
    half = slice(4 * info.rank, 4 * (info.rank + 1))

    reference = build_clip(ModelConfig(**TINY_MODEL)).double()
    reference.load_state_dict(model.state_dict())
    ddp = nn.parallel.DistributedDataParallel(model)
    forward_loss(ddp, images[half], texts[half], make_loss(info)).backward()
    if info.rank == 0:
        forward_loss(reference, images, texts, make_loss(DistInfo())).backward()
        ref = dict(reference.named_parameters())
        diffs = [(p.grad - ref[n].grad).abs().max().item() for n, p in model.named_parameters()]
        (out / "result.json").write_text(json.dumps({
            "num_params_compared": len(diffs), "max_grad_diff": max(diffs),
            "max_grad_abs": max(p.grad.abs().max().item() for p in model.parameters())}))


def _worker(out: Path, shards: str) -> None:
    from baton.cli import main as cli_main
    from test_pretrain import write_tiny_config

    _gradient_check(out)
    cfg = write_tiny_config(out / f"c{os.environ['RANK']}.yaml", out / "run", shards,
                            data={"workers": 3}, train={"log_every": 1})
    rc = cli_main(["pretrain", str(cfg)])
    if rc != 0:
        raise SystemExit(rc)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2])
