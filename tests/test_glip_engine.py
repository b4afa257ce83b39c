"""GLIP on the engine: the loss falls on synthetic grounding scenes and grounding R@1 rises above an
untrained model's; an interrupted and resumed run equals an uninterrupted one; the checkpoint exports
the image backbone as a handoff that finetuning loads. Components: tests/test_glip.py.

The scenes are made here with webdataset's writer (coloured shapes, captions naming them with
character spans), independent of data_prep, as conftest's shards are."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from test_glip import tiny_glip

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220)}
SHAPES = ("square", "circle")


def make_grounding_shards(out: Path, n: int = 48, shard_size: int = 16, size: int = 64, seed: int = 0) -> Path:
    """Scenes of 1-2 shapes of 16-30 px on white; caption "red square and blue circle" with spans."""
    import webdataset as wds

    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(0, n, shard_size):
        name = f"shard-{s // shard_size:06d}.tar"
        with wds.TarWriter(str(out / name)) as w:
            for i in range(s, min(n, s + shard_size)):
                img = Image.new("RGB", (size, size), (255, 255, 255))
                draw = ImageDraw.Draw(img)
                kinds = rng.sample([(c, sh) for c in COLORS for sh in SHAPES], rng.randint(1, 2))
                caption, regions, taken = "", [], []
                for color, shape in kinds:
                    side = rng.randint(16, 30)
                    for _ in range(30):
                        x, y = rng.randint(0, size - side), rng.randint(0, size - side)
                        box = [x, y, x + side, y + side]
                        if all(box[2] < o[0] or o[2] < box[0] or box[3] < o[1] or o[3] < box[1] for o in taken):
                            break
                    else:
                        continue
                    taken.append(box)
                    (draw.rectangle if shape == "square" else draw.ellipse)([x, y, x + side - 1, y + side - 1],
                                                                           fill=COLORS[color])
                    caption += " and " if caption else ""
                    phrase = f"{color} {shape}"
                    regions.append({"bbox": box, "phrase": phrase,
                                    "tokens_positive": [[len(caption), len(caption) + len(phrase)]]})
                    caption += phrase
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                w.write({"__key__": f"scene{i:04d}", "png": buf.getvalue(), "txt": caption,
                         "json": json.dumps({"caption": caption, "regions": regions})})
        shards.append({"name": name, "count": min(n, s + shard_size) - s})
    (out / "stats.json").write_text(json.dumps({"num_samples": n, "written": n, "skipped": {}, "shards": shards}))
    return out


@pytest.fixture(scope="module")
def grounding_shards(tmp_path_factory) -> Path:
    return make_grounding_shards(tmp_path_factory.mktemp("grounding"))


def run_engine(shards: Path, run_dir: Path, *overrides: str, **glip) -> int:
    from baton.config import load_config
    from pretrain.config import PretrainConfig
    from pretrain.train import train

    cfg = load_config(PretrainConfig, None, [
        f"data.train_shards={shards}", f"run_dir={run_dir}", "method=glip", "data.batch_size=8", "data.workers=1",
        "train.epochs=2", "train.log_every=2", "train.threads=1", "optim.warmup_steps=2", "optim.lr=3e-3",
        "optim.weight_decay=0.01", *overrides])
    cfg.glip = tiny_glip(eval=cfg.glip.eval, **glip)   # the overrides' glip.eval.*, the test's glip keys
    return train(cfg)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained_run(grounding_shards, tmp_path_factory) -> Path:
    """40 steps over the 48 scenes, evaluated on them at the end."""
    run = tmp_path_factory.mktemp("glip_run") / "run"
    assert run_engine(grounding_shards, run, "train.epochs=7", "train.max_steps=40", "train.eval_every=40",
                      f"glip.eval.shards={grounding_shards}", "glip.eval.batch_size=16") == 0
    return run


def test_loss_falls_and_grounding_recall_rises(grounding_shards, trained_run):
    """The logged loss falls and grounding R@1 beats the untrained model's."""
    from baton.distributed import DistInfo
    from pretrain.config import PretrainConfig
    from pretrain.glip.evaluation import evaluate_glip
    from pretrain.glip.method import GlipMethod

    rows = metrics(trained_run)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:2]) / 2, losses
    evaluated = [r for r in rows if "grounding_r1" in r]
    trained = evaluated[-1]["grounding_r1"]
    assert all(r["grounding_r1"] <= r["grounding_r5"] <= 1 for r in evaluated), evaluated   # logged with R@1

    cfg = PretrainConfig(method="glip")
    cfg.glip = tiny_glip()
    cfg.glip.eval.shards, cfg.glip.eval.batch_size = str(grounding_shards), 16
    method = GlipMethod(cfg, DistInfo())
    torch.manual_seed(0)
    untrained = method.build_model().eval()
    baseline = evaluate_glip(untrained, method, torch.device("cpu"))
    assert baseline["grounding_regions"] > 48
    assert trained > baseline["grounding_r1"] + 0.2, (trained, baseline)


def test_ground_prints_and_draws_each_phrase(grounding_shards, trained_run, tmp_path, capsys):
    """`baton ground RUN IMAGE "a. b"` on training scenes: one line per phrase, a picture of the image's
    size, and boxes on the named shapes for most phrases (IoU >= 0.5 with the annotation)."""
    import webdataset as wds
    from torchvision.ops import box_iou

    from baton.cli import main as baton_main
    from pretrain.glip.ground import ground, load_run, phrases_of

    assert phrases_of(" red square. blue circle ,x") == [("red square", [1, 11]), ("blue circle", [13, 24]),
                                                          ("x", [26, 27])]
    method, model = load_run(trained_run)
    hits = total = 0
    for raw in list(wds.WebDataset([str(grounding_shards / "shard-000000.tar")], shardshuffle=False))[:12]:
        rec = json.loads(raw["json"])
        image = Image.open(io.BytesIO(raw["png"]))
        found = ground(method, model, image, ". ".join(r["phrase"] for r in rec["regions"]))
        for f, r in zip(found, rec["regions"]):
            assert f["phrase"] == r["phrase"]
            hits += float(box_iou(torch.tensor([f["box"]]), torch.tensor([r["bbox"]], dtype=torch.float))) >= 0.5
            total += 1
    assert hits / total >= 0.5, (hits, total)
    image_path = tmp_path / "scene.png"
    image_path.write_bytes(raw["png"])
    prompt = ". ".join(r["phrase"] for r in rec["regions"])
    assert baton_main(["ground", str(trained_run), str(image_path), prompt, "--out", str(tmp_path / "drawn.png")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in printed[:-1]] == [r["phrase"] for r in rec["regions"]]
    assert Image.open(tmp_path / "drawn.png").size == image.size


def test_resume_equals_uninterrupted_and_exports_the_backbone(grounding_shards, tmp_path):
    """12 steps straight, and cut after 5 then resumed: identical weights; the export is a timm
    handoff whose backbone equals the trained one."""
    from baton.checkpoint import load_checkpoint
    from finetune.model import load_backbone
    from pretrain.glip.model import build_backbone
    from pretrain.strategies import full_model_state

    assert run_engine(grounding_shards, tmp_path / "full", "train.max_steps=12", "train.checkpoint_every=100") == 0
    run_engine(grounding_shards, tmp_path / "cut", "train.max_steps=12", "train.stop_after_steps=5",
               "train.checkpoint_every=5")
    assert run_engine(grounding_shards, tmp_path / "cut", "train.max_steps=12", "resume=latest",
                      "train.checkpoint_every=5") == 0
    (full, full_meta), (cut, cut_meta) = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "cut")
    assert full["step"] == cut["step"] == 12
    a, b = full_model_state(full_meta["path"], full), full_model_state(cut_meta["path"], cut)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k

    from pretrain.export import export

    out = export(tmp_path / "cut", tmp_path / "export")   # `baton export`: the glip config from the checkpoint
    backbone, meta = load_backbone(out)
    assert meta["source"]["method"] == "glip" and meta["library"] == "timm" and meta["source"]["step"] == 12
    reference = build_backbone(tiny_glip())
    reference.load_state_dict({k[len("backbone."):]: v for k, v in a.items() if k.startswith("backbone.")})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), reference.eval()(x))


# ------------------------------------------------------------------ 2 ranks == 1 process

def mapped_batch(shards: Path, n: int = 8) -> tuple:
    """The first n scenes through the method's sample map, stacked, images normalised."""
    import webdataset as wds

    from pretrain.glip.data import GroundingSample
    from pretrain.glip.model import build_tokenizer

    cfg = tiny_glip()
    samples = GroundingSample(cfg, build_tokenizer(cfg))
    raw = list(wds.WebDataset([str(shards / "shard-000000.tar")], shardshuffle=False))[:n]
    cols = [torch.stack(c) for c in zip(*(samples(s, 0) for s in raw))]
    return (samples.batch_normalize(cols[0]), *cols[1:])


def glip_method(rank: int = 0, world: int = 1):
    from baton.config import load_config
    from baton.distributed import DistInfo
    from pretrain.config import PretrainConfig
    from pretrain.glip.method import GlipMethod

    cfg = load_config(PretrainConfig, None, ["method=glip"])
    cfg.glip = tiny_glip()
    return GlipMethod(cfg, DistInfo(rank=rank, world_size=world))


def train_two_steps(net, method, batch: tuple) -> None:
    """SGD: linear in the gradients, so a wrongly normalised rank shows (AdamW would rescale it away)."""
    opt = torch.optim.SGD(method.param_groups(net), lr=0.05)
    for step in range(2):
        loss, _ = method.loss(net, batch, step, 2)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _ddp_worker(rank: int, world: int, init: str, batch: tuple, out: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        method = glip_method(rank, world)
        torch.manual_seed(0)
        model = method.build_model().eval()   # BatchNorm per sample (running stats): see the test
        net = torch.nn.parallel.DistributedDataParallel(model)
        half = tuple(t[rank * 4:(rank + 1) * 4] for t in batch)
        train_two_steps(net, method, half)
        torch.save(model.state_dict(), Path(out) / f"model{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_one_process_on_the_global_batch(grounding_shards, tmp_path):
    """Two DDP steps on 2 gloo ranks (4 scenes each) equal one process on the 8: the loss normalisers
    (positive locations, centerness sum) are averaged over ranks as GLIP does. The backbone's
    BatchNorm is put in eval mode in both runs, since batch statistics differ by construction."""
    import torch.multiprocessing as mp

    batch = mapped_batch(grounding_shards)
    mp.start_processes(_ddp_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", batch, str(tmp_path)),
                       nprocs=2, join=True, start_method="fork")
    method = glip_method()
    torch.manual_seed(0)
    model = method.build_model().eval()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    train_two_steps(model, method, batch)
    for r in range(2):
        got = torch.load(tmp_path / f"model{r}.pt")
        for k, v in model.state_dict().items():
            torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5, msg=lambda m: f"rank {r} {k}: {m}")
    assert not torch.equal(model.state_dict()["bias0"], initial["bias0"])
