"""End-to-end finetuning on synthetic shards with a tiny open_clip handoff, `baton evaluate`,
`baton report`, and resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from baton.cli import main as cli
from baton.config import load_config
from baton.logs import read_metrics, wandb_run_id
from conftest import interrupted_after, make_synthetic_shards

pytest.importorskip("open_clip")

TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32, "mlp_ratio": 2},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}


def write_tiny_handoff(out: Path, seed: int = 0) -> Path:
    import open_clip

    from baton.handoff import write_handoff

    torch.manual_seed(seed)
    clip = open_clip.CLIP(**TINY)
    meta = {"library": "open_clip", "architecture": "test-tiny-vit", "model_config": TINY, "tower": "visual",
            "embedding_dim": 32,
            "preprocess": {"image_size": 32, "mean": [0.48145466, 0.4578275, 0.40821073],
                           "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic"},
            "source": {"checkpoint": "none", "step": 0, "method": "test"}}
    return write_handoff(out, clip.visual.state_dict(), meta)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    make_synthetic_shards(root / "data" / "train", per_class=4, seed=0)
    make_synthetic_shards(root / "data" / "test", per_class=3, seed=1)
    return root, write_tiny_handoff(root / "handoff")


def overrides(root: Path, handoff: Path, run: str, *extra: str) -> list[str]:
    return [f"run_dir={root / run}", f"backbone={handoff}", "data.source=shards", f"data.root={root / 'data'}",
            "data.batch_size=16", "data.m_per_class=4", "model.embedding_dim=16", "loss.centers_per_class=2",
            "optim.lr=1e-3", "optim.head_lr=3e-3", "optim.loss_lr=3e-2", "optim.warmup_steps=2",
            "train.steps_per_epoch=8", "train.log_every=2", "train.tensorboard=false", *extra]


@pytest.mark.slow
def test_finetune_loss_falls_and_evaluates(setup, monkeypatch):
    import sys
    import types

    from finetune.config import FinetuneConfig
    from finetune.train import run

    logged = []   # a stand-in for wandb: what train.wandb_project sends it

    class FakeRun:
        def log(self, row, step):
            logged.append((step, row))

        def finish(self):
            logged.append(("finish",))

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: logged.append(kw) or FakeRun()))
    threads = []   # train.threads reaches torch (recorded, not set: the rest of the suite keeps its threads)
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    root, handoff = setup
    cfg = load_config(FinetuneConfig, None, overrides(root, handoff, "run", "train.epochs=3",
                                                      "train.wandb_project=baton-test", "train.threads=1"))
    summary = run(cfg)
    assert threads == [1]
    inits = [e for e in logged if isinstance(e, dict)]
    assert [i["project"] for i in inits] == ["baton-test"] * 2 and inits[0]["id"] == inits[1]["id"] == wandb_run_id(root / "run")
    rows = [e for e in logged if isinstance(e, tuple) and len(e) == 2]
    assert sum(1 for _, row in rows if "loss" in row) == 12
    assert [step for step, row in rows if "test/recall@1" in row] == [24]
    assert logged.count(("finish",)) == 2
    rows = [r for r in read_metrics(root / "run" / "metrics.jsonl") if "loss" in r]
    assert summary["steps"] == 24 and len(rows) == 12
    first, last = np.mean([r["loss"] for r in rows[:3]]), np.mean([r["loss"] for r in rows[-3:]])
    assert last < 0.7 * first, (first, last)
    ev = json.loads((root / "run" / "eval.json").read_text())
    assert ev["n_classes"] == 16 and ev["n_queries"] == 48
    assert 1 / 16 < ev["recall@1"] <= 1.0 and ev["recall@1"] <= ev["recall@8"]
    assert (root / "run" / "model" / "model.json").is_file()
    assert (root / "run" / "config.yaml").is_file()


@pytest.mark.slow
def test_evaluate_round_trip(setup, tmp_path):
    """`baton evaluate RUN_DIR` rebuilds the saved model: same embeddings as the in-memory one."""
    from finetune.config import FinetuneConfig
    from finetune.datasets import load_dataset
    from finetune.evaluate import retrieval_metrics
    from finetune.model import build_transform, embed_images, load_embedding_model
    from finetune.train import run

    root, handoff = setup
    cfg = load_config(FinetuneConfig, None, overrides(root, handoff, "rt", "train.epochs=1",
                                                      "train.steps_per_epoch=3"))
    run(cfg)
    model, meta = load_embedding_model(root / "rt")
    test = load_dataset("shards", root / "data").test
    images, labels = [im for im, _, _ in test], np.array([y for _, y, _ in test])
    emb = embed_images(model, build_transform(meta["preprocess"]), images)
    assert emb.shape == (48, 16)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)

    out = tmp_path / "eval"
    assert cli(["evaluate", str(root / "rt"), "--data-source", "shards", "--data-root", str(root / "data"),
                "--out", str(out), "--save-embeddings"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    np.testing.assert_array_equal(np.load(out / "embeddings.npy"), emb)
    expected = retrieval_metrics(emb, labels)
    for k, v in expected.items():
        assert m[k] == pytest.approx(v)
    assert m["n_queries"] == 48 and m["n_classes"] == 16 and "finetuned" in m["model"]
    assert (out / "retrieval_grid.png").stat().st_size > 1000

    # the baselines run through the same command
    for spec in (["pixels"], ["random", "--like", str(handoff)], [str(handoff)]):
        d = tmp_path / spec[0].replace("/", "_")[-20:]
        assert cli(["evaluate", *spec, "--data-source", "shards", "--data-root", str(root / "data"),
                    "--out", str(d), "--no-grid"]) == 0
        assert 0.0 <= json.loads((d / "metrics.json").read_text())["recall@1"] <= 1.0

    # and the report collects them
    rep = tmp_path / "report" / "report.md"
    assert cli(["report", "--out", str(rep), "--row", f"pixels={tmp_path / 'pixels'}", "--row", f"finetuned={out}",
                "--loss-curve", f"finetune={root / 'rt' / 'metrics.jsonl'}",
                "--grid", str(out / "retrieval_grid.png")]) == 0
    text = rep.read_text()
    assert "| finetuned |" in text and "Recall@1" in text and "retrieval_grid.png" in text
    assert (rep.parent / "loss_curves.png").is_file()
    assert json.loads((rep.parent / "report.json").read_text())["rows"][1]["recall@1"] == pytest.approx(m["recall@1"])


@pytest.mark.slow
def test_resume_equals_uninterrupted(setup):
    from safetensors.torch import load_file

    from finetune.config import FinetuneConfig
    from finetune.train import run

    root, handoff = setup
    common = ("train.epochs=2", "train.steps_per_epoch=3", "train.checkpoint_every=2", "train.eval_at_end=false")
    run(load_config(FinetuneConfig, None, overrides(root, handoff, "full", *common)))
    # interrupted after step 4 (mid-epoch 2): train 4 steps of the same schedule, then resume
    cut = load_config(FinetuneConfig, None, overrides(root, handoff, "cut", *common))
    from finetune import train as train_mod
    with interrupted_after(train_mod, "lr_factor", 4), pytest.raises(KeyboardInterrupt):
        run(cut)
    assert (root / "cut" / "checkpoints" / "latest").read_text().strip() == "step_000004"
    with pytest.raises(Exception, match="resume=latest"):
        run(cut)
    cut.resume = "latest"
    run(cut)
    a = load_file(str(root / "full" / "model" / "model.safetensors"))
    b = load_file(str(root / "cut" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_evaluate_missing_model_exits_2(tmp_path, capsys):
    rc = cli(["evaluate", str(tmp_path / "nope"), "--data-source", "shards", "--data-root", str(tmp_path),
              "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "nope" in err and "does not exist" in err
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_data_image_size_trains_and_tests_at_that_size_and_saves_it(setup, tmp_path):
    """data.image_size: a convnet handoff of 64 px finetuned and evaluated on 32 px images at 32 px;
    the saved model keeps the size, and `baton evaluate` embeds as the model in memory at that size.
    A backbone that cannot take the size is refused naming the key."""
    import timm

    from baton.errors import BatonError
    from finetune.config import FinetuneConfig
    from finetune.datasets import load_dataset
    from finetune.model import build_transform, embed_images, load_embedding_model
    from finetune.train import run
    from pretrain.models import register_timm_models
    from pretrain.timm_weights import export_timm_backbone

    register_timm_models()
    root, vit = setup
    torch.manual_seed(0)
    net = timm.create_model("small_convnet", num_classes=0)
    convnet = export_timm_backbone(tmp_path / "convnet", timm.create_model("small_convnet", num_classes=0),
                                   net.state_dict(), "test", "small_convnet",
                                   {"model_name": "small_convnet", "num_classes": 0},
                                   {"image_size": 64, "mean": [0.5] * 3, "std": [0.25] * 3,
                                    "interpolation": "bilinear"}, {"method": "test"})
    args = overrides(root, convnet, "sized", "train.epochs=1", "train.steps_per_epoch=2", "data.image_size=32")
    run(load_config(FinetuneConfig, None, args))
    model, meta = load_embedding_model(root / "sized")
    assert meta["preprocess"]["image_size"] == 32 and meta["backbone"]["preprocess"]["image_size"] == 32
    test = load_dataset("shards", root / "data").test
    images = [im for im, _, _ in test]
    seen = []
    real_forward = model.backbone.forward
    model.backbone.forward = lambda x: seen.append(tuple(x.shape[-2:])) or real_forward(x)
    emb = embed_images(model, build_transform(meta["preprocess"]), images[:4])
    assert seen == [(32, 32)] and emb.shape == (4, 16)
    out = tmp_path / "eval"
    assert cli(["evaluate", str(root / "sized"), "--data-source", "shards", "--data-root", str(root / "data"),
                "--out", str(out), "--save-embeddings", "--no-grid"]) == 0
    model.backbone.forward = real_forward
    np.testing.assert_allclose(np.load(out / "embeddings.npy")[:4], emb, atol=1e-6)
    with pytest.raises(BatonError, match="data.image_size=48: the backbone test-tiny-vit does not take 48 x 48"):
        run(load_config(FinetuneConfig, None, overrides(root, vit, "vit48", "train.epochs=1", "data.image_size=48")))
