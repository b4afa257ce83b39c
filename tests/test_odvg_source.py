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


def test_odvg_bad_records_are_skipped_by_reason(tmp_path):
    """Boxes outside the image, swapped or empty, spans outside the caption, an empty caption, a
    line that is not UTF-8, a record without a filename, an image that does not decode, a declared
    size that is not the file's: each counted by reason, never a traceback or a written bad box."""
    imgs = tmp_path / "images"
    imgs.mkdir()
    (imgs / "a.jpg").write_bytes(image_bytes("JPEG"))                      # 40 x 30
    (imgs / "bad.png").write_bytes(image_bytes("PNG")[:40])                # header only: decodes nowhere

    def rec(bbox, spans=((0, 5),), caption="a dog on a sofa", filename="a.jpg", **extra):
        region = {"bbox": bbox, "phrase": "a dog", "tokens_positive": [list(s) for s in spans]}
        return json.dumps({"filename": filename, **extra, "grounding": {"caption": caption, "regions": [region]}})

    lines = [rec([1, 2, 20, 25]),                                          # kept
             rec([1, 2, 40.5, 25], spans=((0, 5), (10, 15))),              # kept, clipped to x = 40
             rec([100, 200, 300, 400]), rec([20, 2, 1, 25]), rec([1, 2, 1, 2]), rec([1, 2, "nan", 25]),
             rec([1, 2]), rec([1, 2, 20, 25], spans=((50, 90),)), rec([1, 2, 20, 25], spans=((0.5, 3),)),
             rec([1, 2, 20, 25], caption=" "), rec([1, 2, 20, 25], filename=None),
             rec([1, 2, 20, 25], filename="bad.png"), rec([1, 2, 20, 25], width=400, height=300),
             '{"filename": "a.jpg", "grounding": {"caption": "caf\xe9", "regions": []}}', "[1, 2]"]
    jsonl = tmp_path / "ann.jsonl"
    jsonl.write_bytes(b"\n".join(l.encode("latin-1") for l in lines) + b"\n")
    out = tmp_path / "out"
    assert baton_main(["shards", "odvg", str(jsonl), "--images", str(imgs), "--out", str(out)]) == 0

    stats = json.loads((out / "stats.json").read_text())
    assert stats["num_samples"] == 2
    assert stats["skipped"] == {"box_outside_image": 1, "empty_box": 2, "bad_annotation": 2,
                                "span_outside_caption": 2, "no_regions": 7, "empty_caption": 1, "bad_record": 2,
                                "undecodable_image": 1, "size_mismatch": 1, "undecodable_record": 1}
    samples = list(wds.WebDataset([str(out / s["name"]) for s in stats["shards"]], shardshuffle=False))
    assert [json.loads(s["json"])["regions"][0]["bbox"] for s in samples] == [[1, 2, 20, 25], [1, 2, 40, 25]]
