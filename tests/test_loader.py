"""The streaming loader (`pretrain.data`): modes, weighted sources, corrupt samples, exact resume.

Shards are written here with webdataset's own TarWriter (tiny PNGs with known keys); most tests
read keys, not pixels, through a cheap transform, so they test the loader rather than the model.
"""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from baton.config import load_config
from baton.errors import BatonError
from pretrain.config import DataConfig, PretrainConfig
from pretrain.data import SampleToPair, TrainLoader, make_loader, resolve_sources
from pretrain.data.samples import group_samples


def png(seed: int, size: int = 8) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def good(key: str, seed: int = 0, size: int = 8) -> dict:
    return {"__key__": key, "png": png(seed, size), "txt": f"caption of {key}"}


def write_shard(path: Path, samples: list[dict]) -> Path:
    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)
    return path


def write_good_shards(out: Path, shards: int, per_shard: int, prefix: str = "s", size: int = 8) -> list[str]:
    """`shards` shards of `per_shard` good samples each plus stats.json; returns all keys."""
    keys, entries = [], []
    for s in range(shards):
        samples = [good(f"{prefix}{s:02d}_{i:03d}", s * 1000 + i, size) for i in range(per_shard)]
        write_shard(out / f"shard-{s:06d}.tar", samples)
        entries.append({"name": f"shard-{s:06d}.tar", "count": per_shard})
        keys += [x["__key__"] for x in samples]
    (out / "stats.json").write_text(json.dumps({"num_samples": len(keys), "shards": entries}))
    return keys


def write_corrupt_shards(out: Path, size: int = 8) -> dict:
    """Four shards with every kind of bad sample; returns the expected skip counts and good keys."""
    a = [good(f"a{i}", i, size) for i in range(6)] + [
        {"__key__": "badimg", "png": b"not a png at all", "txt": "broken image"},
        {"__key__": "notxt", "png": png(1, size)},
        {"__key__": "blank", "png": png(2, size), "txt": "   "},
        {"__key__": "latin1", "png": png(3, size), "txt": "café".encode("latin-1")},
        {"__key__": "noimg", "txt": "caption without image"},
        {"__key__": "split", "png": png(4, size)}]                       # its txt is in shard b
    b = [{"__key__": "split", "txt": "the other half"}] + [good(f"b{i}", 10 + i, size) for i in range(6)] + [
        good("dup", 20, size), good("dup", 21, size), good("b0", 22, size), good("b6", 23, size)]
    write_shard(out / "a.tar", a)
    write_shard(out / "b.tar", b)
    trunc = write_shard(out / "c.tar", [good(f"c{i}", 30 + i, size) for i in range(3)])
    with tarfile.open(trunc) as t:   # cut shard c inside its third sample's first file
        cut = next(m for m in t.getmembers() if m.name.startswith("c2.")).offset_data + 10
    trunc.write_bytes(trunc.read_bytes()[:cut])
    (out / "d.tar").write_bytes(b"this is not a tar file" * 50)
    expected = {"bad_image": 1, "missing_caption": 3, "bad_caption": 1, "missing_image": 2,
                "duplicate_key": 2, "unreadable_shard": 2}
    good_keys = [f"a{i}" for i in range(6)] + [f"b{i}" for i in range(7)] + ["dup", "c0", "c1"]
    return {"skipped": expected, "good": good_keys}


def cheap_pair(caption: str = "txt") -> SampleToPair:
    def transform(img):
        return torch.from_numpy(np.asarray(img.resize((4, 4)), dtype=np.float32)).permute(2, 0, 1) / 255

    return SampleToPair(transform, lambda texts: torch.tensor([[len(t) for t in texts]]), caption)


def data_cfg(shards, **kw) -> DataConfig:
    return DataConfig(**{"train_shards": str(shards), "batch_size": 4, "workers": 2, "shuffle_buffer": 16, **kw})


def epoch_keys(sources, dcfg, *, epoch=0, rank=0, world_size=1, steps, seed=0) -> list[list[str]]:
    loader = make_loader(sources, dcfg, cheap_pair(), seed=seed, epoch=epoch, rank=rank, steps=steps,
                         world_size=world_size)
    return [meta["keys"] for _, _, meta in loader]


# ---------------------------------------------------------------- modes


@pytest.mark.slow
def test_epoch_exact_reads_every_sample_once_split_by_rank_and_worker(tmp_path):
    keys = write_good_shards(tmp_path, shards=8, per_shard=8)
    dcfg = data_cfg(tmp_path, mode="epoch_exact")
    sources = resolve_sources(dcfg.train_shards)
    sources.check_enough_shards("epoch_exact", 2, 2)
    steps = 64 // (4 * 2)
    seen = {}
    for epoch in (0, 1):
        per_rank = [epoch_keys(sources, dcfg, epoch=epoch, rank=r, world_size=2, steps=steps) for r in (0, 1)]
        assert [len(b) for b in per_rank] == [steps, steps]   # every rank the same number of batches
        flat = [k for batches in per_rank for b in batches for k in b]
        assert sorted(flat) == sorted(keys)                   # each sample exactly once per epoch
        assert not set(itertools.chain(*per_rank[0])) & set(itertools.chain(*per_rank[1]))
        seen[epoch] = flat
    assert seen[0] != seen[1]                                 # the shard order and shuffle change by epoch


@pytest.mark.slow
def test_resampled_more_readers_than_shards_and_the_epoch_exact_check(tmp_path):
    write_good_shards(tmp_path, shards=3, per_shard=8)
    dcfg = data_cfg(tmp_path, workers=3)
    sources = resolve_sources(dcfg.train_shards)
    sources.check_enough_shards("resampled", 2, 3)           # fine: resampled never runs dry
    batches = [epoch_keys(sources, dcfg, rank=r, world_size=2, steps=7) for r in (0, 1)]
    assert [len(b) for b in batches] == [7, 7] and all(len(b) == 4 for r in batches for b in r)
    assert batches == [epoch_keys(sources, dcfg, rank=r, world_size=2, steps=7) for r in (0, 1)]  # seeded
    assert batches[0] != batches[1]

    with pytest.raises(BatonError) as e:
        sources.check_enough_shards("epoch_exact", 2, 3)
    msg = str(e.value)
    assert "2 ranks x 3 workers = 6 readers" in msg and "3 shards" in msg
    assert "data.workers to 1" in msg and "data.mode=resampled" in msg and "re-shard" in msg
    with pytest.raises(BatonError, match=r"^unknown data.mode 'exact' \(did you mean 'epoch_exact'\?\): choose one of "):
        sources.check_enough_shards("exact", 1, 1)


def test_weighted_sources_epoch_exact_and_resampled(tmp_path):
    a = write_good_shards(tmp_path / "a", shards=4, per_shard=8, prefix="a")
    b = write_good_shards(tmp_path / "b", shards=4, per_shard=8, prefix="b")
    cfg = load_config(PretrainConfig, overrides=[
        f"data.train_shards=[{{url: {tmp_path / 'a'}, weight: 2.0}}, {{url: {tmp_path / 'b'}, weight: 0.5}}]",
        "data.mode=epoch_exact", "data.workers=0", "data.batch_size=8", "data.shuffle_buffer=0"])
    sources = resolve_sources(cfg.data.train_shards)
    assert sources.num_samples == 2 * 32 + 16 and len(sources.epoch_shards(0, 0)) == 10
    counts = Counter(k for batch in epoch_keys(sources, cfg.data, steps=10) for k in batch)
    assert {counts[k] for k in a} == {2}                          # every shard of a twice
    assert sum(counts[k] for k in b) == 16 and {counts[k] for k in b if k in counts} == {1}  # half of b once

    cfg.data.mode = "resampled"
    drawn = [k for batch in epoch_keys(sources, cfg.data, steps=60) for k in batch]
    share = sum(k.startswith("a") for k in drawn) / len(drawn)
    assert 0.6 < share < 0.95, share                              # 2 x 4 / (2 x 4 + 0.5 x 4) = 0.8

    with pytest.raises(BatonError, match="weight must be > 0"):
        resolve_sources([{"url": str(tmp_path / "a"), "weight": 0}])
    with pytest.raises(BatonError, match=r"train_shards\[1\]"):
        resolve_sources([str(tmp_path / "a"), {"path": "x"}])


# ---------------------------------------------------------------- corrupt samples


def test_random_augmentations_are_the_same_in_a_worker_and_in_process(tmp_path):
    """A sample's augmentation depends on its seed only: one DataLoader worker (which does not put
    the RNG states back) gives the batches the training process itself gives (which does)."""
    from torchvision import transforms as T

    write_good_shards(tmp_path, shards=2, per_shard=8, size=16)
    augment = T.Compose([T.RandomResizedCrop(8, scale=(0.2, 1.0)), T.RandomHorizontalFlip(), T.ColorJitter(0.4, 0.4),
                         T.ToTensor()])
    to_pair = SampleToPair(augment, lambda texts: torch.tensor([[len(t) for t in texts]]), "txt")

    def batches(workers):
        dcfg = data_cfg(tmp_path, workers=workers, mode="epoch_exact")
        loader = make_loader(resolve_sources(dcfg.train_shards), dcfg, to_pair, seed=3, epoch=0, rank=0, steps=4)
        return [(images.clone(), meta["keys"]) for images, _, meta in loader]

    in_process, in_worker = batches(0), batches(1)
    assert [k for _, k in in_process] == [k for _, k in in_worker]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(in_process, in_worker))
    assert not torch.equal(in_process[0][0][0], in_process[0][0][1])


def test_group_samples_marks_keys_repeated_in_a_shard_or_across_a_boundary():
    def files(*names):
        return [{"fname": n, "data": b"x", "__url__": "u"} if n else {} for n in names]

    out = list(group_samples(iter(files("k.png", "k.txt", "j.png", "", "j.txt", "j.png", "m.png", "m.png",
                                        "m.txt", "k.png", ""))))
    got = [(s["__key__"], sorted(k for k in s if not k.startswith("__")), s.get("__reject__")) for s in out]
    assert got == [("k", ["png", "txt"], None), ("j", ["png"], None),
                   ("j", ["png", "txt"], "duplicate_key"),           # the key the previous shard ended with
                   ("m", ["png"], None), ("m", ["png", "txt"], "duplicate_key"),  # same key twice in a row
                   ("k", ["png"], None)]                             # k again, but in another shard


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    truth = write_corrupt_shards(tmp_path)
    dcfg = data_cfg(tmp_path, mode="epoch_exact", workers=0, shuffle_buffer=0, batch_size=4)
    sources = resolve_sources(dcfg.train_shards)
    # a seed whose shard order ends with shard b (it ends with a good sample, so all of the epoch is read)
    seed = next(s for s in range(100) if sources.epoch_shards(s, 0)[-1].endswith("b.tar"))
    loader = TrainLoader(sources, dcfg, cheap_pair(), seed=seed, rank=0, world_size=1, steps=4)
    keys = [k for _, _, batch in loader.epoch_batches() for k in batch]
    assert sorted(keys) == sorted(truth["good"])
    assert loader.skipped() == dict(sorted(truth["skipped"].items()))
    assert loader.epoch == 1 and loader.state_dict()["past_skipped"] == truth["skipped"]


# ---------------------------------------------------------------- exact resume, one rank


def _run(sources, dcfg, steps, *, stop=None, state=None, start=0):
    loader = TrainLoader(sources, dcfg, cheap_pair("random"), seed=3, rank=0, world_size=1, steps=steps)
    if state is not None:
        assert loader.load_state_dict(state, start)
    out = []
    while loader.epoch < 2:
        for images, _, keys in loader.epoch_batches():
            out.append((keys, images))
            if stop is not None and start + len(out) == stop:
                return out, loader
    return out, loader


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["resampled", "epoch_exact"])
def test_resume_sees_exactly_the_samples_of_an_uninterrupted_run(tmp_path, mode):
    write_good_shards(tmp_path / "good", shards=5, per_shard=7)
    write_corrupt_shards(tmp_path / "bad")
    dcfg = data_cfg(None, mode=mode, workers=3, batch_size=3)
    sources = resolve_sources([str(tmp_path / "good"), str(tmp_path / "bad")])
    steps = 7
    full, whole = _run(sources, dcfg, steps)
    assert len(full) == 2 * steps
    for stop in (5, 9):                                   # mid-epoch 0 (stop % 3 workers != 0), mid-epoch 1
        head, cut = _run(sources, dcfg, steps, stop=stop)
        path = tmp_path / f"state{stop}.pt"
        torch.save(cut.state_dict(), path)                # as in the training checkpoint
        state = torch.load(path, weights_only=True)
        del cut
        tail, resumed = _run(sources, dcfg, steps, state=state, start=stop)
        assert [k for k, _ in head + tail] == [k for k, _ in full]
        assert all(torch.equal(x, y) for (_, x), (_, y) in zip(head + tail, full))  # same augmentation
        assert resumed.skipped() == whole.skipped() and sum(whole.skipped().values()) > 0


# ---------------------------------------------------------------- through `baton pretrain`, one rank


def train_keys(cfg_path: Path, *overrides: str) -> dict[int, list[str]]:
    """Run pretraining; return the sample keys of each step (the `on_batch` hook)."""
    from pretrain.train import train

    keys: dict[int, list[str]] = {}
    cfg = load_config(PretrainConfig, cfg_path, overrides)
    assert train(cfg, on_batch=lambda step, k: keys.__setitem__(step, list(k))) == 0
    return keys


def resume_check(tmp: Path, cfg_path: Path, stop: int, every: int, *overrides: str) -> dict:
    """Uninterrupted vs stopped-after-`stop` + resume=latest: returns what the caller asserts on."""
    from baton.checkpoint import load_checkpoint

    common = (f"train.checkpoint_every={every}", *overrides)
    full = train_keys(cfg_path, f"run_dir={tmp / 'full'}", *common)
    cut = train_keys(cfg_path, f"run_dir={tmp / 'cut'}", *common, f"train.stop_after_steps={stop}")
    resumed = train_keys(cfg_path, f"run_dir={tmp / 'cut'}", *common, "resume=latest")
    last = (stop // every) * every
    joined = {s: k for s, k in cut.items() if s <= last} | resumed
    a, _ = load_checkpoint(tmp / "full")
    b, _ = load_checkpoint(tmp / "cut")
    return {"full": full, "joined": joined, "resumed_from": min(resumed), "last": last,
            "skipped": [a["loader"]["skipped"], b["loader"]["skipped"]],
            "same_weights": all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])}


@pytest.mark.slow
def test_pretrain_resumes_exactly_over_corrupt_data_and_counts_skips(tmp_path, synthetic_shards):
    from test_pretrain import write_tiny_config

    bad = tmp_path / "bad"
    write_corrupt_shards(bad, size=32)
    cfg = write_tiny_config(tmp_path / "c.yaml", tmp_path / "unused", "",
                            data={"train_shards": [str(synthetic_shards), {"url": str(bad), "weight": 1.0}],
                                  "workers": 2, "mode": "epoch_exact", "num_samples": 40},
                            train={"epochs": 2})  # 5 steps/epoch of 8 samples
    result = resume_check(tmp_path, cfg, stop=4, every=3)
    assert result["resumed_from"] == 4 and sorted(result["full"]) == list(range(1, 11))
    assert result["joined"] == result["full"] and result["same_weights"]
    full_skips, resumed_skips = result["skipped"]
    assert full_skips == resumed_skips and sum(full_skips.values()) > 0
    log = (tmp_path / "full" / "log.txt").read_text()
    assert 0 < log.count("skipped sample") <= 2 * 6 * 3   # bounded: 3 lines per worker and reason
