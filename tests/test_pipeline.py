"""The four stages chained through the `baton` CLI, as `make demo` chains them, on a class-folder
tree: folder -> shards -> CLIP pretraining -> export -> finetuning -> evaluation -> report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from baton.cli import main as cli
from conftest import COLORS, SHAPES, draw_shape

TINY_CLIP = """
run_dir: {run}
seed: 0
data:
  train_shards: {shards}
  batch_size: 16
  workers: 1
  shuffle_buffer: 16
model:
  name: test-tiny-vit
  config:
    embed_dim: 32
    vision_cfg: {{image_size: 32, patch_size: 8, width: 64, layers: 2, head_width: 32, mlp_ratio: 2.0}}
    text_cfg: {{context_length: 16, vocab_size: 49408, width: 64, heads: 2, layers: 1}}
optim: {{lr: 1.0e-3, warmup_steps: 2}}
train: {{epochs: 2, checkpoint_every: 3, log_every: 1, threads: 1}}
"""


def make_class_folders(root: Path, per_class: int = 3) -> None:
    rng = np.random.default_rng(0)
    for color, rgb in COLORS.items():
        for shape in SHAPES:
            d = root / f"{color}_{shape}"
            d.mkdir(parents=True)
            for i in range(per_class):
                draw_shape(shape, rgb, 32, rng).save(d / f"{i}.png")


@pytest.mark.slow
def test_cli_pipeline_end_to_end(tmp_path, capsys):
    images, shards, run = tmp_path / "images", tmp_path / "shards", tmp_path / "runs"
    make_class_folders(images)
    (images / "split.json").write_text(json.dumps({
        "train": [f"{c}_{s}" for c in COLORS for s in SHAPES[:2]],
        "test": [f"{c}_{s}" for c in COLORS for s in SHAPES[2:]]}))

    assert cli(["shards", "folder", str(images), "--out", str(shards), "--shard-size", "8"]) == 0
    stats = json.loads((shards / "stats.json").read_text())
    assert stats["num_samples"] == 48 and len(stats["shards"]) == 6

    cfg = tmp_path / "clip.yaml"
    cfg.write_text(TINY_CLIP.format(run=run / "pretrain", shards=shards))
    assert cli(["pretrain", str(cfg)]) == 0
    assert cli(["pretrain", str(cfg), "resume=latest"]) == 0  # finished run: nothing left to do
    export = run / "pretrain" / "export"
    assert cli(["export", str(run / "pretrain"), str(export)]) == 0
    meta = json.loads((export / "backbone.json").read_text())
    assert meta["source"]["step"] == 6 and meta["embedding_dim"] == 32

    data = ["--data-source", "folder", "--data-root", str(images)]
    assert cli(["evaluate", "random", "--like", str(export), *data, "--out", str(run / "eval_random")]) == 0
    assert cli(["evaluate", str(export), *data, "--out", str(run / "eval_pretrained")]) == 0

    ft = [f"run_dir={run / 'finetune'}", f"backbone={export}", "data.source=folder", f"data.root={images}",
          "data.batch_size=8", "data.m_per_class=2", "model.embedding_dim=16", "loss.centers_per_class=2",
          "train.epochs=2", "train.log_every=1", "train.tensorboard=false"]
    assert cli(["finetune", "configs/demo_softtriple.yaml", *ft]) == 0
    assert cli(["evaluate", str(run / "finetune"), *data, "--out", str(run / "eval_finetuned")]) == 0

    for name in ("eval_random", "eval_pretrained", "eval_finetuned"):
        m = json.loads((run / name / "metrics.json").read_text())
        assert m["n_classes"] == 8 and m["n_queries"] == 24  # only the held-out classes
        assert set(m) >= {"recall@1", "recall@2", "recall@4", "recall@8", "map@r", "nmi"}
        assert (run / name / "retrieval_grid.png").is_file()

    report = run / "report.md"
    assert cli(["report", "--out", str(report),
                "--row", f"random init={run / 'eval_random'}", "--row", f"CLIP pretrained={run / 'eval_pretrained'}",
                "--row", f"SoftTriple finetuned={run / 'eval_finetuned'}",
                "--loss-curve", f"pretrain={run / 'pretrain' / 'metrics.jsonl'}",
                "--loss-curve", f"finetune={run / 'finetune' / 'metrics.jsonl'}"]) == 0
    text = report.read_text()
    for row in ("random init", "CLIP pretrained", "SoftTriple finetuned"):
        assert row in text
    assert len(list(tmp_path.rglob("*.png"))) >= 4
