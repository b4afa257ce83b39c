"""DINO's k-NN monitor (pretrain/dino/monitor.py) against a brute-force computation.

The brute force reads the shards with tarfile, embeds one image at a time with the teacher backbone
and votes neighbour by neighbour in plain Python; the monitor reads through the labelled-shard
reader, embeds in batches (on 1 or 2 ranks) and votes with `weighted_knn`.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from baton.distributed import DistInfo
from baton.errors import BatonError
from pretrain.dino.method import DinoMethod
from pretrain.dino.monitor import memory_query_split
from test_dino import tiny_config


def monitored_method(shards: Path, info: DistInfo = DistInfo(), **over) -> DinoMethod:
    cfg = SimpleNamespace(dino=tiny_config(knn_shards=str(shards), **over),
                          data=SimpleNamespace(num_samples=64, batch_size=8, train_shards=None))
    return DinoMethod(cfg, info)


def build_model(method: DinoMethod):
    torch.manual_seed(0)
    model = method.build_model()
    with torch.no_grad():  # a teacher different from the student: the monitor must embed with the teacher
        for p in model.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def brute_force_knn(shards: Path, backbone, k: int, temperature: float, mean, std) -> tuple[float, float, int]:
    """(top-1 %, top-5 %, queries): samples in shard order, per class even positions memory / odd queries."""
    raw: dict[str, dict] = {}
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                key, ext = m.name.split(".", 1)
                raw.setdefault(key, {})[ext] = t.extractfile(m).read()
    labels, feats = [], []
    backbone.eval()
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    with torch.no_grad():
        for sample in raw.values():  # insertion order = shard order
            labels.append(json.loads(sample["json"])["class"])
            img = Image.open(io.BytesIO(sample["png"])).convert("RGB")   # already 32 px: no resize
            x = torch.tensor(list(img.getdata()), dtype=torch.float32).T.reshape(3, 32, 32) / 255.0
            feats.append(backbone(((x - m) / s)[None])[0])
    count: dict[str, int] = defaultdict(int)
    memory, queries = [], []
    for i, c in enumerate(labels):
        (memory if count[c] % 2 == 0 else queries).append(i)
        count[c] += 1
    classes = sorted(set(labels))
    hits1 = hits5 = 0
    for q in queries:
        sims = sorted(((float(F.cosine_similarity(feats[q], feats[j], dim=0)), j) for j in memory), reverse=True)
        votes = {c: 0.0 for c in classes}
        for sim, j in sims[:k]:
            votes[labels[j]] += math.exp(sim / temperature)
        ranked = sorted(classes, key=lambda c: (-votes[c], classes.index(c)))
        hits1 += ranked[0] == labels[q]
        hits5 += labels[q] in ranked[:min(5, k)]
    return 100.0 * hits1 / len(queries), 100.0 * hits5 / len(queries), len(queries)


def test_split_is_per_class_alternating():
    assert memory_query_split(["a", "b", "a", "a", "c", "b"]) == ([0, 1, 3, 4], [2, 5])


def test_monitor_equals_brute_force(synthetic_shards):
    method = monitored_method(synthetic_shards, knn_max_samples=None, knn_batch_size=7)
    model = build_model(method)
    got = method.evaluate(model, step=10)
    assert model.teacher.backbone.training  # the monitor restores the training mode it found
    top1, top5, n = brute_force_knn(synthetic_shards, model.teacher.backbone, 20, 0.07,
                                    method.dino.mean, method.dino.std)
    assert got["knn_queries"] == n == 32 and got["knn_skipped"] == 0
    assert got["knn_top1"] == pytest.approx(top1) and got["knn_top5"] == pytest.approx(top5)
    # the student is not what is measured: with its weights in the teacher the numbers change
    student_view = brute_force_knn(synthetic_shards, model.student.backbone, 20, 0.07,
                                   method.dino.mean, method.dino.std)
    assert (top1, top5) != student_view[:2]


def test_monitor_off_without_shards_and_errors_without_queries(synthetic_shards):
    cfg = SimpleNamespace(dino=tiny_config(), data=SimpleNamespace(num_samples=64, batch_size=8, train_shards=None))
    method = DinoMethod(cfg, DistInfo())
    assert method.evaluate(method.build_model(), step=1) == {}
    method = monitored_method(synthetic_shards, knn_max_samples=1)   # one sample: nothing to query
    with pytest.raises(BatonError, match="dino.knn_shards"):
        method.evaluate(method.build_model(), step=1)
    method = monitored_method(synthetic_shards.parent / "no_such_shards")
    with pytest.raises(BatonError, match="dino.knn_shards"):
        method.evaluate(method.build_model(), step=1)


def _rank_worker(rank: int, world: int, init: str, shards: str, out: str) -> None:
    import torch.distributed as dist
    from datetime import timedelta

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        # 41 samples at batch 4: rank 0 embeds 21 (6 batches), rank 1 20 (5 batches + 1 dummy forward)
        method = monitored_method(Path(shards), DistInfo(rank=rank, world_size=world), knn_max_samples=41,
                                  knn_batch_size=4)
        (Path(out) / f"knn{rank}.json").write_text(json.dumps(method.evaluate(build_model(method), step=1)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_one_process(synthetic_shards, tmp_path):
    """Each rank embeds its slice; the gathered features give the single process's numbers on every rank."""
    import torch.multiprocessing as mp

    mp.start_processes(_rank_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", str(synthetic_shards),
                                           str(tmp_path)), nprocs=2, join=True, start_method="fork")
    single = monitored_method(synthetic_shards, knn_max_samples=41, knn_batch_size=4)
    expected = single.evaluate(build_model(single), step=1)
    for r in range(2):
        got = json.loads((tmp_path / f"knn{r}.json").read_text())
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-9), (r, key)


@pytest.mark.slow
def test_engine_logs_the_monitor_of_its_teacher(synthetic_shards, tmp_path):
    """`train.eval_every` on the engine: knn_top1 is logged, and at the last step it is the monitor's
    value for the teacher in the final checkpoint."""
    from baton.checkpoint import load_checkpoint
    from baton.config import load_config
    from pretrain.config import PretrainConfig
    from pretrain.dino.model import DinoModel
    from pretrain.strategies import full_model_state
    from pretrain.train import train

    cfg = load_config(PretrainConfig, None, [
        f"data.train_shards={synthetic_shards}", f"run_dir={tmp_path / 'run'}", "method=dino", "data.batch_size=8",
        "data.workers=0", "train.epochs=1", "train.log_every=100", "train.threads=1", "optim.warmup_steps=2",
        "train.eval_every=4", "train.checkpoint_every=100"])
    cfg.dino = tiny_config(knn_shards=str(synthetic_shards), knn_max_samples=None)
    assert train(cfg) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    knn = {r["step"]: r for r in rows if "knn_top1" in r}
    assert sorted(knn) == [4, 8]
    state, meta = load_checkpoint(tmp_path / "run")
    assert state["step"] == 8
    model = DinoModel(cfg.dino)
    model.load_state_dict(full_model_state(meta["path"], state))
    method = monitored_method(synthetic_shards, knn_max_samples=None)
    expected = method.evaluate(model, step=8)
    assert knn[8]["knn_top1"] == pytest.approx(expected["knn_top1"])
    assert knn[8]["knn_top5"] == pytest.approx(expected["knn_top5"])
