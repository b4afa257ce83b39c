"""Parquet tables, img2dataset output (tars and files layout), and the image/caption options."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from baton.cli import main as baton_main


def _img(fmt: str, size=(40, 20), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _samples(d: Path) -> dict[str, dict]:
    stats = json.loads((d / "stats.json").read_text())
    urls = [str(d / s["name"]) for s in stats["shards"]]
    out = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}
    assert len(out) == stats["written"]
    return out


def test_parquet_table_keeps_typed_extra_columns(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(_img("JPEG", seed=i))
    table = pa.table({"path": ["imgs/0.jpg", "imgs/1.jpg", "imgs/2.jpg", "imgs/none.jpg", None],
                      "text": ["zero", "one", "two", "gone", "no image"],
                      "score": [0.5, float("nan"), 1.5, 0.0, 0.0], "width": [40, 40, 40, 1, 1],
                      "tags": [["a", "b"], [], ["c"], [], []]})
    pq.write_table(table, tmp_path / "pairs.parquet")
    out = tmp_path / "out"
    assert baton_main(["shards", "parquet", str(tmp_path / "pairs.parquet"), "--out", str(out),
                       "--image-col", "path", "--caption-col", "text"]) == 0
    samples = {json.loads(s["json"])["source"]: s for s in _samples(out).values()}
    assert set(samples) == {"imgs/0.jpg", "imgs/1.jpg", "imgs/2.jpg"}
    meta = json.loads(samples["imgs/0.jpg"]["json"])
    assert meta["score"] == 0.5 and meta["width"] == 40 and meta["tags"] == ["a", "b"]
    assert json.loads(samples["imgs/1.jpg"]["json"])["score"] is None  # NaN -> null, valid JSON
    assert samples["imgs/2.jpg"]["jpg"] == _img("JPEG", seed=2) and samples["imgs/2.jpg"]["txt"] == b"two"
    assert json.loads((out / "stats.json").read_text())["skipped"] == {"missing_file": 1, "missing_image_path": 1}


def _img2dataset_samples() -> list[tuple[str, bytes | None, str | None, dict]]:
    """(key, jpg, caption, json) as img2dataset writes them; a sample without an image, and one
    whose image is broken."""
    rows = []
    for i in range(7):
        key = f"0000{i // 4}{i:04d}"
        jpg = _img("JPEG", seed=10 + i) if i != 5 else b"\xff\xd8 broken"
        rows.append((key, jpg if i != 3 else None, f"photo {i}",
                     {"url": f"http://example.com/{i}.jpg", "key": key, "status": "success", "width": 40}))
    return rows


def _write_img2dataset_tars(root: Path) -> None:
    root.mkdir()
    rows = _img2dataset_samples()
    for shard in (0, 1):
        with tarfile.open(root / f"0000{shard}.tar", "w") as tf:
            for key, jpg, caption, meta in rows[shard * 4:(shard + 1) * 4]:
                for ext, data in (("jpg", jpg), ("txt", caption.encode()), ("json", json.dumps(meta).encode())):
                    if data is None:
                        continue
                    ti = tarfile.TarInfo(f"{key}.{ext}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
        (root / f"0000{shard}_stats.json").write_text("{}")


def _write_img2dataset_files(root: Path) -> None:
    for key, jpg, caption, meta in _img2dataset_samples():
        d = root / key[:5]
        d.mkdir(parents=True, exist_ok=True)
        if jpg is not None:
            (d / f"{key}.jpg").write_bytes(jpg)
        (d / f"{key}.txt").write_text(caption)
        (d / f"{key}.json").write_text(json.dumps(meta))
    (root / "00000_stats.json").write_text("{}")


@pytest.mark.parametrize("layout", [_write_img2dataset_tars, _write_img2dataset_files])
def test_img2dataset_reshard_keeps_bytes_and_json(tmp_path, layout):
    root = tmp_path / "i2d"
    layout(root)
    out = tmp_path / "out"
    assert baton_main(["shards", "img2dataset", str(root), "--out", str(out), "--shard-size", "2"]) == 0
    samples = _samples(out)
    expected = {key: (jpg, caption, meta) for key, jpg, caption, meta in _img2dataset_samples()
                if jpg is not None and not jpg.endswith(b"broken")}
    assert set(samples) == set(expected)
    for key, (jpg, caption, meta) in expected.items():
        got = json.loads(samples[key]["json"])
        assert samples[key]["jpg"] == jpg and samples[key]["txt"].decode() == caption
        assert {k: got[k] for k in meta} == meta  # img2dataset's json fields kept
    assert json.loads((out / "stats.json").read_text())["skipped"] == {"missing_image": 1, "undecodable_image": 1}


@pytest.fixture
def photos(tmp_path) -> Path:
    """A table of images of several sizes and captions of several lengths."""
    d = tmp_path / "photos"
    d.mkdir()
    sizes = [(40, 20), (20, 40), (10, 8), (64, 64), (30, 30)]
    captions = ["a wide image", "a tall image", "tiny", "a square photograph of considerable length", "ok"]
    lines = ["image,caption"]
    for i, (size, cap) in enumerate(zip(sizes, captions)):
        (d / f"{i}.png").write_bytes(_img("PNG", size=size, seed=i))
        lines.append(f"{i}.png,{cap}")
    (d / "t.csv").write_text("\n".join(lines) + "\n")
    return d / "t.csv"


def _by_source(out: Path) -> dict[str, dict]:
    return {json.loads(s["json"])["source"]: s for s in _samples(out).values()}


def test_max_side_min_size_and_jpeg_quality(photos, tmp_path):
    out = tmp_path / "out"
    assert baton_main(["shards", "table", str(photos), "--out", str(out), "--max-side", "32",
                       "--min-size", "9"]) == 0
    got = _by_source(out)
    assert "2.png" not in got  # 10x8: shorter side below --min-size
    expect = {"0.png": (32, 16), "1.png": (16, 32), "3.png": (32, 32), "4.png": (30, 30)}  # never upscaled
    for src, size in expect.items():
        assert Image.open(io.BytesIO(got[src]["png"])).size == size
    assert got["4.png"]["png"] == (photos.parent / "4.png").read_bytes()  # small enough: untouched
    assert json.loads((out / "stats.json").read_text())["skipped"] == {"too_small": 1}
    sizes = {}
    for q in (20, 95):
        o = tmp_path / f"q{q}"
        assert baton_main(["shards", "table", str(photos), "--out", str(o), "--jpeg-quality", str(q)]) == 0
        s = _by_source(o)["3.png"]
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.format == "JPEG" and img.size == (64, 64)
        sizes[q] = len(s["jpg"])
    assert sizes[20] < sizes[95]


@pytest.mark.parametrize("mode,expected", [
    ("truncate", {"0.png": "a wide", "1.png": "a tall", "3.png": "a squar"}),
    ("skip", {}),
])
def test_caption_limits(photos, tmp_path, mode, expected):
    out = tmp_path / "out"
    assert baton_main(["shards", "table", str(photos), "--out", str(out), "--min-caption-chars", "3",
                       "--max-caption-chars", "7", "--long-captions", mode]) == 0
    got = {src: s["txt"].decode() for src, s in _by_source(out).items()}
    assert got == {"2.png": "tiny", **expected}  # "ok" is too short; the rest is longer than 7
    skipped = json.loads((out / "stats.json").read_text())["skipped"]
    assert skipped == ({"caption_too_short": 1} if mode == "truncate"
                       else {"caption_too_short": 1, "caption_too_long": 3})
