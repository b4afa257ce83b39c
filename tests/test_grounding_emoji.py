"""The grounding-emoji source: record format, spans, boxes on the drawn pixels, class split, determinism."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from baton.cli import main as baton_main

pytest.importorskip("emoji")
from data_prep.emoji_designs import load_designs  # noqa: E402

FOUND, _ = load_designs(["twemoji", "openmoji", "noto", "emojione"])
pytestmark = pytest.mark.skipif(len(FOUND) < 2, reason="needs >= 2 emoji designs")
ARGS = ["--max-classes", "10", "--train-scenes", "30", "--test-scenes", "10", "--size", "64", "--shard-size", "16"]


def build(out: Path, *extra: str) -> int:
    return baton_main(["shards", "grounding-emoji", "--out", str(out), *ARGS, *extra])


def read_split(d: Path) -> list[dict]:
    stats = json.loads((d / "stats.json").read_text())
    return list(wds.WebDataset([str(d / s["name"]) for s in stats["shards"]], shardshuffle=False))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("grounding") / "out"
    assert build(out) == 0
    return out


def test_records_name_their_regions_and_boxes_cover_drawn_pixels(built):
    samples = read_split(built / "train")
    assert len(samples) == 30
    counts = set()
    for s in samples:
        rec = json.loads(s["json"])
        assert s["txt"].decode() == rec["caption"]
        image = np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB"))
        assert image.shape == (64, 64, 3)
        drawn = (image < 250).any(-1)   # every non-white pixel lies in some region's box
        inside = np.zeros_like(drawn)
        counts.add(len(rec["regions"]))
        for r in rec["regions"]:
            (start, end), = r["tokens_positive"]
            assert rec["caption"][start:end] == r["phrase"]
            x0, y0, x1, y1 = r["bbox"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            assert drawn[y0:y1, x0:x1].any()
            inside[y0:y1, x0:x1] = True
        assert not (drawn & ~inside).any()
        assert len({r["phrase"] for r in rec["regions"]}) == len(rec["regions"])  # a class once per scene
    assert counts <= {1, 2, 3, 4} and len(counts) > 1


def test_held_out_scenes_show_only_held_out_classes_split_as_the_emoji_source(built, tmp_path):
    split = json.loads((built / "split.json").read_text())
    assert not set(split["train"]) & set(split["test"])
    for part in ("train", "test"):
        phrases = {r["phrase"] for s in read_split(built / part) for r in json.loads(s["json"])["regions"]}
        assert phrases <= set(split[part])
    assert baton_main(["shards", "emoji", "--out", str(tmp_path / "emoji"), "--max-classes", "10"]) == 0
    assert json.loads((tmp_path / "emoji" / "split.json").read_text()) == split


def test_left_and_right_of_are_true_the_order_is_not_the_layout_and_output_is_byte_identical(built, tmp_path):
    named_left_to_right, several = 0, 0
    for s in read_split(built / "train"):
        rec = json.loads(s["json"])
        for a, b in zip(rec["regions"], rec["regions"][1:]):
            joint = rec["caption"][a["tokens_positive"][0][1]:b["tokens_positive"][0][0]]
            assert joint in (" left of ", " right of ", " and ", ", ")
            if joint == " left of ":
                assert a["bbox"][2] <= b["bbox"][0]
            if joint == " right of ":
                assert b["bbox"][2] <= a["bbox"][0]
        if len(rec["regions"]) > 1:   # the caption's order does not give the boxes away
            several += 1
            centres = [r["bbox"][0] + r["bbox"][2] for r in rec["regions"]]
            named_left_to_right += centres == sorted(centres)
    assert 0 < named_left_to_right < several
    assert build(tmp_path / "again") == 0
    for part in ("train", "test"):
        for shard in sorted((built / part).glob("*.tar")):
            assert (tmp_path / "again" / part / shard.name).read_bytes() == shard.read_bytes()


def test_val_scenes_are_new_scenes_of_the_train_classes_and_leave_train_and_test_as_they_were(built, tmp_path):
    out = tmp_path / "with_val"
    assert build(out, "--val-scenes", "12") == 0
    split = json.loads((out / "split.json").read_text())
    val = read_split(out / "val")
    assert len(val) == 12
    assert {r["phrase"] for s in val for r in json.loads(s["json"])["regions"]} <= set(split["train"])
    train_images = {s["png"] for s in read_split(out / "train")}
    assert not {s["png"] for s in val} & train_images          # no training scene is repeated
    for part in ("train", "test"):                              # the other parts are those of a build without val
        for shard in sorted((built / part).glob("*.tar")):
            assert (out / part / shard.name).read_bytes() == shard.read_bytes()
    stats = json.loads((out / "stats.json").read_text())
    assert stats["val"]["written"] == 12 and stats["num_samples"] == 30 + 10 + 12


def test_a_negative_scene_count_is_refused_naming_the_flag(tmp_path, capsys):
    assert build(tmp_path / "neg", "--val-scenes", "-1") == 2
    assert "--val-scenes must be >= 0" in capsys.readouterr().err
