"""The emoji source on a few classes: split, designs, json fields, determinism, idempotent reruns."""

from __future__ import annotations

import io
import json
from collections import defaultdict
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from baton.cli import main as baton_main

pytest.importorskip("emoji")
from data_prep.emoji_designs import load_designs  # noqa: E402

FOUND, _MISSING = load_designs(["twemoji", "openmoji", "noto", "emojione"])
pytestmark = pytest.mark.skipif(len(FOUND) < 2, reason="needs >= 2 emoji designs (pip install 'baton[emoji]')")
N_CLASSES = 20


def build(out: Path, *extra: str) -> int:
    return baton_main(["shards", "emoji", "--out", str(out), "--max-classes", str(N_CLASSES),
                       "--shard-size", "16", *extra])


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def read_split(d: Path) -> list[dict]:
    stats = json.loads((d / "stats.json").read_text())
    urls = [str(d / s["name"]) for s in stats["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == stats["num_samples"]
    return samples


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("emoji") / "out"
    assert build(out) == 0
    return out


def test_split_is_disjoint_complete_and_matches_shards(built):
    split = json.loads((built / "split.json").read_text())
    train, test = set(split["train"]), set(split["test"])
    assert len(split["train"]) + len(split["test"]) == N_CLASSES
    assert len(train) == len(split["train"]) and len(test) == len(split["test"])
    assert not train & test and abs(len(train) - len(test)) <= 1
    for part, names in (("train", train), ("test", test)):
        classes = {json.loads(s["json"])["class"] for s in read_split(built / part)}
        assert classes == names  # every listed class is in its shards, and nothing else


def test_every_class_has_two_designs_and_fields(built):
    designs = defaultdict(set)
    keys = set()
    for part in ("train", "test"):
        for s in read_split(built / part):
            meta = json.loads(s["json"])
            assert {"class", "design", "captions"} <= set(meta)
            assert isinstance(meta["captions"], list)
            assert s["txt"].decode("utf-8") == meta["class"]  # caption = CLDR name = class name
            assert meta["design"] in {d.name for d in FOUND}
            img = Image.open(io.BytesIO(s["png"]))
            assert img.format == "PNG" and img.size == (64, 64) and img.mode == "RGB"
            extrema = img.convert("L").getextrema()
            assert extrema[0] < 200, f"{s['__key__']} looks blank"
            assert meta["design"] not in designs[meta["class"]], "a design twice in one class"
            designs[meta["class"]].add(meta["design"])
            keys.add(s["__key__"])
    assert len(designs) == N_CLASSES
    assert all(len(d) >= 2 for d in designs.values())
    assert len(keys) == sum(len(d) for d in designs.values())  # one sample per (class, design)
    stats = json.loads((built / "stats.json").read_text())
    assert stats["designs"]["found"] == [d.name for d in FOUND]
    assert stats["num_samples"] == len(keys)


def test_known_emoji_caption_and_aliases():
    from data_prep.sources.emoji import catalogue
    by_text = {c.text: c for c in catalogue()}
    grin = by_text["\U0001F600"]
    assert grin.name == "grinning face" and "grinning" in grin.captions
    assert by_text["\U0001F1EF\U0001F1F5"].name == "flag: Japan"
    assert not any("skin tone" in c.name for c in by_text.values())
    assert len({c.name for c in by_text.values()}) == len(by_text)


def test_deterministic_and_seed_dependent(built, tmp_path):
    again = tmp_path / "again"
    assert build(again) == 0
    assert shard_bytes(again) == shard_bytes(built)  # byte-identical shards, split and stats
    other = tmp_path / "seed1"
    assert build(other, "--seed", "1") == 0
    assert json.loads((other / "split.json").read_text()) != json.loads((built / "split.json").read_text())


def test_rerun_is_skipped_unless_arguments_change_or_forced(tmp_path, capsys):
    out = tmp_path / "out"
    assert build(out) == 0
    shard = out / "train" / "shard-000000.tar"
    mtime = shard.stat().st_mtime_ns
    capsys.readouterr()
    assert build(out) == 0
    assert "already built" in capsys.readouterr().out
    assert shard.stat().st_mtime_ns == mtime
    assert build(out, "--force") == 0
    assert "already built" not in capsys.readouterr().out
    assert build(out, "--size", "32") == 0  # different arguments: rebuilt
    (s,) = list(wds.WebDataset(str(shard), shardshuffle=False))[:1]
    assert Image.open(io.BytesIO(s["png"])).size == (32, 32)
    assert json.loads((out / "stats.json").read_text())["args"]["size"] == 32
