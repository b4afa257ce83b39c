"""The ODVG source: grounding records kept, detection records prompted with class names, bad lines counted."""

from __future__ import annotations

import io
import json
import webdataset as wds
from PIL import Image

from baton.cli import main as baton_main


def image_bytes(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(buf, format=fmt)
    return buf.getvalue()


def test_odvg_grounding_and_detection_records(tmp_path):
    imgs = tmp_path / "images"
    imgs.mkdir()
    (imgs / "a.jpg").write_bytes(image_bytes("JPEG"))
    (imgs / "b.png").write_bytes(image_bytes("PNG"))
    lines = [
        {"filename": "a.jpg", "height": 30, "width": 40, "grounding": {
            "caption": "a dog on a red sofa",
            "regions": [{"bbox": [1, 2, 20, 25], "phrase": "a dog", "tokens_positive": [[0, 5]]},
                        {"bbox": [0, 10, 40, 30], "phrase": "red sofa"}]}},            # span found in the caption
        {"filename": "b.png", "detection": {"instances": [
            {"bbox": [3, 4, 10, 12], "label": 2, "category": "cat"}, {"bbox": [5, 5, 9, 9], "label": 0}]}},
        {"filename": "missing.jpg", "grounding": {"caption": "x", "regions": []}},
        "not json",
    ]
    jsonl = imgs / "ann.jsonl"
    jsonl.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    label_map = tmp_path / "labels.json"
    label_map.write_text(json.dumps({"0": "person", "1": "car", "2": "cat"}))
    out = tmp_path / "out"
    assert baton_main(["shards", "odvg", str(jsonl), "--out", str(out), "--label-map", str(label_map)]) == 0

    stats = json.loads((out / "stats.json").read_text())
    assert stats["num_samples"] == 2
    assert stats["skipped"] == {"missing_image": 1, "bad_record": 1}
    samples = {s["__key__"]: s for s in wds.WebDataset([str(out / s["name"]) for s in stats["shards"]],
                                                      shardshuffle=False)}
    a, b = json.loads(samples["a"]["json"]), json.loads(samples["b"]["json"])
    assert samples["a"]["jpg"] == (imgs / "a.jpg").read_bytes() and samples["b"]["png"] == (imgs / "b.png").read_bytes()
    assert [a["caption"][s:e] for r in a["regions"] for s, e in r["tokens_positive"]] == ["a dog", "red sofa"]
    assert a["regions"][1]["bbox"] == [0, 10, 40, 30] and a["width"] == 40
    assert b["caption"] == "person. car. cat."
    assert [(r["phrase"], b["caption"][slice(*r["tokens_positive"][0])], r["bbox"]) for r in b["regions"]] == [
        ("cat", "cat", [3, 4, 10, 12]), ("person", "person", [5, 5, 9, 9])]
    assert samples["b"]["txt"].decode() == b["caption"]
