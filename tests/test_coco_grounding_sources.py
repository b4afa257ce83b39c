"""The COCO-json grounding sources (`baton shards mdetr`, `baton shards coco-detection`): records read
back through GLIP's own reader equal the input, every bad input is skipped and counted by reason,
a rerun resumes, and a class split keeps only its classes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from baton.cli import main as baton_main
from pretrain.data.labelled import grounding_record, read_labelled
from pretrain.glip.config import GlipConfig


def write_image(path: Path, w: int, h: int, fmt: str = "JPEG") -> None:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (30, 120, 200)).save(buf, format=fmt)
    path.write_bytes(buf.getvalue())


def records_of(out: Path) -> dict[str, dict]:
    """key -> (grounding record, image bytes) as GLIP's evaluation/training reader gives them."""
    data = read_labelled(str(out), grounding=True)
    return {s.key: (grounding_record(s.record), s.raw()) for s in data.samples}


def stats_of(out: Path) -> dict:
    return json.loads((out / "stats.json").read_text())


# ------------------------------------------------------------------ MDETR


@pytest.fixture
def mdetr_input(tmp_path):
    imgs = tmp_path / "flickr30k-images"
    imgs.mkdir()
    write_image(imgs / "1000.jpg", 100, 80)
    write_image(imgs / "2000.png", 60, 50, "PNG")
    (imgs / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg at all")
    cap1 = "A man in a blue shirt holds a small dog"
    cap2 = "a dog"
    images = [
        {"id": 0, "file_name": "1000.jpg", "caption": cap1, "width": 100, "height": 80},
        {"id": 1, "file_name": "1000.jpg", "caption": "The man", "width": 100, "height": 80},  # same image, 2nd caption
        {"id": 2, "file_name": "2000.png", "caption": cap2, "width": 60, "height": 50},
        {"id": 3, "file_name": "missing.jpg", "caption": "a cat", "width": 10, "height": 10},
        {"id": 4, "file_name": "broken.jpg", "caption": "a cat", "width": 10, "height": 10},
        {"id": 5, "file_name": "1000.jpg", "caption": "   ", "width": 100, "height": 80},
        {"id": 6, "file_name": "2000.png", "caption": "a dog", "width": 61, "height": 50},    # resized image
    ]
    annotations = [
        {"id": 10, "image_id": 0, "bbox": [10, 5, 30, 60], "tokens_positive": [[0, 5]]},           # "A man"
        {"id": 11, "image_id": 0, "bbox": [50.5, 40, 20.25, 15], "tokens_positive": [[11, 21], [30, 39]]},
        {"id": 12, "image_id": 0, "bbox": [90, 10, 20, 10], "tokens_positive": [[0, 5]]},           # past x = 100
        {"id": 13, "image_id": 0, "bbox": [10, 10, 0, 10], "tokens_positive": [[0, 5]]},            # zero width
        {"id": 14, "image_id": 0, "bbox": [10, 10, 5, 5], "tokens_positive": [[30, 45]]},           # past the caption
        {"id": 15, "image_id": 99, "bbox": [1, 1, 5, 5], "tokens_positive": [[0, 1]]},              # no image 99
        {"id": 16, "image_id": 1, "bbox": [0, 0, 100.4, 80], "tokens_positive": [[4, 7]]},          # clipped to 100
        {"id": 17, "image_id": 2, "bbox": [2, 3, 40, 30], "tokens_positive": [[2, 5]]},
        {"id": 18, "image_id": 3, "bbox": [1, 1, 5, 5], "tokens_positive": [[2, 5]]},
        {"id": 19, "image_id": 4, "bbox": [1, 1, 5, 5], "tokens_positive": [[2, 5]]},
        {"id": 20, "image_id": 6, "bbox": [1, 1, 5, 5], "tokens_positive": [[2, 5]]},
    ]
    ann = tmp_path / "final_flickr_separateGT_train.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": []}))
    return ann, imgs, cap1, cap2


def test_mdetr_records_read_back_through_glip_reader(mdetr_input, tmp_path):
    ann, imgs, cap1, cap2 = mdetr_input
    out = tmp_path / "out"
    assert baton_main(["shards", "mdetr", str(ann), "--images", str(imgs), "--out", str(out),
                       "--shard-size", "2"]) == 0
    stats = stats_of(out)
    assert stats["skipped"] == {"box_outside_image": 1, "empty_box": 1, "span_outside_caption": 1,
                                "missing_image_id": 1, "missing_image": 1, "undecodable_image": 1,
                                "empty_caption": 1, "size_mismatch": 1}
    recs = records_of(out)
    assert sorted(recs) == ["1000_0", "1000_1", "2000_2"]
    r0, raw0 = recs["1000_0"]
    assert r0["caption"] == cap1 and (r0["width"], r0["height"]) == (100, 80) and r0["image_id"] == 0
    assert r0["regions"] == [
        {"bbox": [10.0, 5.0, 40.0, 65.0], "phrase": "A man", "tokens_positive": [[0, 5]]},
        {"bbox": [50.5, 40.0, 70.75, 55.0], "phrase": "blue shirt small dog", "tokens_positive": [[11, 21], [30, 39]]}]
    assert [r0["caption"][s:e] for s, e in r0["regions"][1]["tokens_positive"]] == ["blue shirt", "small dog"]
    assert raw0["jpg"] == (imgs / "1000.jpg").read_bytes()          # bytes unchanged
    r1, _ = recs["1000_1"]
    assert r1["regions"] == [{"bbox": [0.0, 0.0, 100.0, 80.0], "phrase": "man", "tokens_positive": [[4, 7]]}]
    r2, raw2 = recs["2000_2"]
    assert r2["caption"] == cap2 and raw2["png"] == (imgs / "2000.png").read_bytes()
    assert r2["regions"] == [{"bbox": [2.0, 3.0, 42.0, 33.0], "phrase": "dog", "tokens_positive": [[2, 5]]}]


def test_mdetr_shards_feed_glip_sample_map(mdetr_input, tmp_path):
    """The positive map GLIP trains on marks exactly the tokens of each region's phrase."""
    from pretrain.glip.data import GroundingSample
    from pretrain.glip.model import build_tokenizer

    ann, imgs, cap1, _ = mdetr_input
    out = tmp_path / "out"
    assert baton_main(["shards", "mdetr", str(ann), "--images", str(imgs), "--out", str(out)]) == 0
    sample = next(s for s in read_labelled(str(out), grounding=True).samples if s.key == "1000_0")
    cfg = GlipConfig(image_size=50, max_tokens=16, max_regions=4)
    tok = build_tokenizer(cfg)
    image, ids, _, boxes, valid, pmap = GroundingSample(cfg, tok)(sample.raw(), 0)
    assert valid.tolist() == [1.0, 1.0, 0.0, 0.0]
    torch.testing.assert_close(boxes[:2], torch.tensor([[5.0, 3.125, 20.0, 40.625], [25.25, 25.0, 35.375, 34.375]]))
    words = tok.convert_ids_to_tokens(ids.tolist())
    assert [w for w, p in zip(words, pmap[0]) if p] == ["a", "man"]
    assert [w for w, p in zip(words, pmap[1]) if p] == ["blue", "shirt", "small", "dog"]


def test_mdetr_rerun_resumes_and_refuses_bad_json(mdetr_input, tmp_path, capsys):
    ann, imgs, _, _ = mdetr_input
    out = tmp_path / "out"
    args = ["shards", "mdetr", str(ann), "--images", str(imgs), "--out", str(out), "--shard-size", "2"]
    assert baton_main(args) == 0
    before = {p.name: p.read_bytes() for p in out.glob("shard-*.tar")}
    (out / sorted(before)[0]).unlink()                       # a lost shard: only it is written again
    assert baton_main(args) == 0
    stats = stats_of(out)
    assert stats["throughput"]["samples"] == 2 and stats["written"] == 3
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.tar")} == before
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": []}))
    assert baton_main(["shards", "mdetr", str(bad), "--images", str(imgs), "--out", str(tmp_path / "o2")]) == 2
    assert f"{bad}: no list under 'annotations'" in capsys.readouterr().err


# ------------------------------------------------------------------ COCO detection


@pytest.fixture
def coco_input(tmp_path):
    imgs = tmp_path / "train2017"
    imgs.mkdir()
    write_image(imgs / "000001.jpg", 64, 48)
    write_image(imgs / "000002.jpg", 32, 32)
    write_image(imgs / "000003.jpg", 32, 32)
    images = [{"id": 1, "file_name": "000001.jpg", "width": 64, "height": 48},
              {"id": 2, "file_name": "000002.jpg", "width": 32, "height": 32},
              {"id": 3, "file_name": "000003.jpg", "width": 32, "height": 32},   # no annotation at all
              {"id": 4, "file_name": "000004.jpg", "width": 32, "height": 32}]   # no file
    categories = [{"id": 3, "name": "car"}, {"id": 1, "name": "person"}, {"id": 10, "name": "traffic_light"},
                  {"id": 2, "name": "bicycle"}]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 2, 10, 20], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 10, "bbox": [30, 5, 4, 12], "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [0, 0, 64, 48], "iscrowd": 1},     # crowd
        {"id": 4, "image_id": 1, "category_id": 7, "bbox": [0, 0, 5, 5]},                     # no category 7
        {"id": 5, "image_id": 1, "category_id": 1, "bbox": [60, 40, 10, 10]},                 # outside
        {"id": 6, "image_id": 2, "category_id": 1, "bbox": [4, 4, 8, 16]},
        {"id": 7, "image_id": 2, "category_id": 2, "bbox": [4, 4, 8, -1]},                    # negative height
        {"id": 8, "image_id": 8, "category_id": 2, "bbox": [4, 4, 8, 8]},                     # no image 8
        {"id": 9, "image_id": 4, "category_id": 2, "bbox": [4, 4, 8, 8]},
    ]
    ann = tmp_path / "instances_train2017.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return ann, imgs


def test_coco_detection_prompt_in_category_id_order(coco_input, tmp_path):
    ann, imgs = coco_input
    out = tmp_path / "out"
    assert baton_main(["shards", "coco-detection", str(ann), "--images", str(imgs), "--out", str(out)]) == 0
    assert stats_of(out)["skipped"] == {"crowd_box": 1, "unknown_category": 1, "box_outside_image": 1,
                                        "empty_box": 1, "missing_image_id": 1, "missing_image": 1, "no_regions": 1}
    recs = records_of(out)
    assert sorted(recs) == ["000001", "000002"]
    r1, raw1 = recs["000001"]
    prompt = "person. bicycle. car. traffic light."
    assert r1["caption"] == prompt and raw1["jpg"] == (imgs / "000001.jpg").read_bytes()
    assert r1["regions"] == [
        {"bbox": [1.0, 2.0, 11.0, 22.0], "phrase": "car", "tokens_positive": [[17, 20]]},
        {"bbox": [30.0, 5.0, 34.0, 17.0], "phrase": "traffic light", "tokens_positive": [[22, 35]]}]
    for r in r1["regions"]:
        assert [prompt[s:e] for s, e in r["tokens_positive"]] == [r["phrase"]]
    r2, _ = recs["000002"]
    assert r2["caption"] == prompt
    assert r2["regions"] == [{"bbox": [4.0, 4.0, 12.0, 20.0], "phrase": "person", "tokens_positive": [[0, 6]]}]


def test_coco_detection_class_split(coco_input, tmp_path, capsys):
    ann, imgs = coco_input
    base = ["shards", "coco-detection", str(ann), "--images", str(imgs)]
    assert baton_main([*base, "--out", str(tmp_path / "test"), "--classes", "traffic light,bicycle"]) == 0
    recs = records_of(tmp_path / "test")
    assert list(recs) == ["000001"]
    rec, _ = recs["000001"]
    assert rec["caption"] == "bicycle. traffic light."
    assert rec["regions"] == [{"bbox": [30.0, 5.0, 34.0, 17.0], "phrase": "traffic light",
                               "tokens_positive": [[9, 22]]}]
    assert baton_main([*base, "--out", str(tmp_path / "train"), "--exclude-classes", "traffic_light,bicycle"]) == 0
    recs = records_of(tmp_path / "train")
    assert recs["000001"][0]["caption"] == "person. car."
    assert [r["phrase"] for r in recs["000001"][0]["regions"]] == ["car"]
    assert [r["phrase"] for r in recs["000002"][0]["regions"]] == ["person"]
    assert stats_of(tmp_path / "train")["skipped"]["excluded_class"] == 2
    assert baton_main([*base, "--out", str(tmp_path / "x"), "--classes", "bicycel"]) == 2
    assert "'bicycel' (did you mean 'bicycle'?)" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert baton_main([*base, "--out", str(tmp_path / "x"), "--classes", "car", "--exclude-classes", "person"]) == 2
    assert "not both" in capsys.readouterr().err
