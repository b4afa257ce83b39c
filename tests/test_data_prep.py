"""data_prep: the shared shard writer, the folder and table sources, and `baton shards` errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from baton.cli import main as baton_main
from data_prep.job import write_shards
from data_prep.writer import Sample, Skip, safe_key


def _image_bytes(fmt: str, size=(20, 12), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def read_shards(d: Path) -> dict[str, dict]:
    """All samples of a shard directory, by key, read back with webdataset itself."""
    stats = json.loads((d / "stats.json").read_text())
    urls = [str(d / s["name"]) for s in stats["shards"]]
    assert sorted(p.name for p in d.glob("shard-*.tar")) == [s["name"] for s in stats["shards"]]
    samples = {}
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        assert s["__key__"] not in samples, "duplicate key"
        samples[s["__key__"]] = s
    assert len(samples) == stats["num_samples"] == stats["written"]
    assert sum(s["count"] for s in stats["shards"]) == stats["num_samples"]
    return samples


@pytest.fixture
def image_tree(tmp_path) -> tuple[Path, dict[tuple[str, str], bytes]]:
    """ROOT/<class>/<files>: good PNG/JPEG files plus a corrupt, a fake and a non-image file."""
    root = tmp_path / "tree"
    good = {}
    for i, (cls, name, fmt) in enumerate([("red_apple", "a.png", "PNG"), ("red_apple", "b.jpg", "JPEG"),
                                          ("pear", "x.y.png", "PNG"), ("pear", "sub/deep.jpeg", "JPEG")]):
        p = root / cls / name
        p.parent.mkdir(parents=True, exist_ok=True)
        data = _image_bytes(fmt, seed=i)
        p.write_bytes(data)
        good[(cls, name)] = data
    jpeg = _image_bytes("JPEG", size=(64, 64), seed=9)
    (root / "pear" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "pear" / "notes.jpg").write_text("this is not an image")
    (root / "pear" / "README.txt").write_text("readme")
    (root / "stray.png").write_bytes(_image_bytes("PNG"))
    return root, good


def test_folder_round_trip_keeps_bytes_and_counts_skips(image_tree, tmp_path, capsys):
    root, good = image_tree
    out = tmp_path / "shards"
    assert baton_main(["shards", "folder", str(root), "--out", str(out), "--shard-size", "3"]) == 0
    samples = read_shards(out)
    stats = json.loads((out / "stats.json").read_text())
    assert set(stats) == {"num_samples", "shards", "written", "skipped", "bytes", "inputs", "plan", "throughput"}
    assert stats["num_samples"] == 4 and stats["inputs"] == 8
    # shard k holds inputs [3k, 3k+3) of the 6 image files (sorted): notes deep truncated | x.y a b
    assert [s["count"] for s in stats["shards"]] == [1, 3]
    # open_clip_train's get_dataset_size: sizes.json beside the shards, {shard basename: samples}
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {s["name"]: s["count"] for s in stats["shards"]}
    assert sum(sizes[p.name] for p in out.glob("*.tar")) == stats["num_samples"]
    assert stats["bytes"] == sum((out / s["name"]).stat().st_size for s in stats["shards"])
    assert stats["throughput"]["samples"] == 4
    assert stats["skipped"] == {"undecodable_image": 2, "not_an_image_extension": 1, "outside_class_folder": 1}
    by_source = {json.loads(s["json"])["source"]: s for s in samples.values()}
    for (cls, name), data in good.items():
        s = by_source[f"{cls}/{name}"]
        ext = "png" if name.endswith(".png") else "jpg"
        assert s[ext] == data  # original bytes, untouched
        assert s["txt"].decode() == cls.replace("_", " ")
        assert json.loads(s["json"])["class"] == cls
    assert all("." not in k and "/" not in k for k in samples)
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))
    printed = capsys.readouterr().out
    assert "written" in printed and "undecodable_image" in printed


def test_folder_resize_stores_png_with_short_side(image_tree, tmp_path):
    root, _ = image_tree
    out = tmp_path / "small"
    assert baton_main(["shards", "folder", str(root), "--out", str(out), "--size", "8"]) == 0
    samples = read_shards(out)
    assert len(samples) == 4
    for s in samples.values():
        assert "jpg" not in s
        img = Image.open(io.BytesIO(s["png"]))
        assert img.format == "PNG" and img.mode == "RGB" and min(img.size) == 8
        assert max(img.size) in (8, 13)  # 20x12 -> 13x8, aspect kept


def _write_table(tmp_path: Path, sep: str, name: str) -> tuple[Path, dict[str, bytes]]:
    d = tmp_path / "table"
    (d / "imgs").mkdir(parents=True)
    files = {"imgs/one.png": _image_bytes("PNG", seed=1), "imgs/two.jpg": _image_bytes("JPEG", seed=2)}
    for rel, data in files.items():
        (d / rel).write_bytes(data)
    (d / "imgs/bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    rows = [["image", "caption", "class", "photographer"],
            ["imgs/one.png", "a red café", "fruit", "Zoë"],
            ["imgs/two.jpg", "two; with, punctuation", "", "Al"],
            ["imgs/missing.png", "gone", "x", "y"],
            ["imgs/bad.png", "broken", "x", "y"],
            ["imgs/one.png", "", "x", "y"]]
    table = d / name
    if sep == ",":
        import csv
        with open(table, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(rows)
    else:
        table.write_text("\n".join(sep.join(r) for r in rows) + "\n", encoding="utf-8")
    return table, files


@pytest.mark.parametrize("sep,name", [(",", "pairs.csv"), ("\t", "pairs.tsv"), ("\t", "pairs.txt")])
def test_table_round_trip(tmp_path, sep, name):
    table, files = _write_table(tmp_path, sep, name)
    out = tmp_path / "out"
    assert baton_main(["shards", "csv", str(table), "--out", str(out)]) == 0
    samples = read_shards(out)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["skipped"] == {"missing_file": 1, "undecodable_image": 1, "empty_caption": 1}
    got = {json.loads(s["json"])["source"]: s for s in samples.values()}
    assert set(got) == set(files)
    one, two = got["imgs/one.png"], got["imgs/two.jpg"]
    assert one["png"] == files["imgs/one.png"] and two["jpg"] == files["imgs/two.jpg"]
    assert one["txt"].decode("utf-8") == "a red café"
    assert two["txt"].decode("utf-8") == "two; with, punctuation"
    meta = json.loads(one["json"])
    assert meta["photographer"] == "Zoë" and meta["class"] == "fruit"
    assert json.loads(two["json"])["class"] == "two; with, punctuation"  # no class: caption is the class


def test_table_custom_columns_and_separator(tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    (d / "p.png").write_bytes(_image_bytes("PNG"))
    (d / "data.dat").write_text("path|text\np.png|hello\n")
    out = tmp_path / "out"
    argv = ["shards", "csv", str(d / "data.dat"), "--out", str(out), "--image-col", "path",
            "--caption-col", "text", "--sep", "pipe"]
    assert baton_main(argv) == 0
    (s,) = read_shards(out).values()
    assert s["txt"] == b"hello"


class Boom(RuntimeError):
    pass


def _records(n: int, fail_after: int | None = None):
    png = _image_bytes("PNG")
    for i in range(n):
        if fail_after is not None and i == fail_after:
            raise Boom("source failed")
        if i % 4 == 3:
            yield Skip("odd", f"item {i}")
        yield Sample(key=f"item.{i}/x", image=png, ext="png", caption=f"c{i}", meta={"class": "c"})


def test_writer_exception_leaves_no_partial_shard(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Boom):
        write_shards(_records(10, fail_after=5), out, shard_size=3)
    names = sorted(p.name for p in out.iterdir() if p.name != "_progress")
    assert names == ["shard-000000.tar"]  # the complete shard only: no partial, no temp, no stats
    assert len(list(wds.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False))) == 3


def test_writer_rerun_replaces_stale_shards_and_is_reproducible(tmp_path):
    out = tmp_path / "out"
    first = write_shards(_records(10), out, shard_size=2)
    assert first["num_samples"] == 10 and first["skipped"] == {"odd": 2} and len(first["shards"]) == 5
    second = write_shards(_records(5), out, shard_size=2)
    assert [s["name"] for s in second["shards"]] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert sorted(p.name for p in out.glob("shard-*.tar")) == [s["name"] for s in second["shards"]]
    other = tmp_path / "again"
    write_shards(_records(5), other, shard_size=2)
    for s in second["shards"]:
        assert (out / s["name"]).read_bytes() == (other / s["name"]).read_bytes()
    assert json.loads((out / "stats.json").read_text()) == second


def test_writer_rejects_bad_shard_size(tmp_path):
    from baton.errors import BatonError
    with pytest.raises(BatonError, match="shard-size"):
        write_shards(_records(2), tmp_path / "o", shard_size=0)


def test_safe_key_and_uniqueness(tmp_path):
    assert safe_key("a.b/c d") == "a_b_c_d"
    assert safe_key("😀") == "sample"
    long = safe_key("x" * 300)
    assert len(long) <= 80 and long != safe_key("x" * 299)
    png = _image_bytes("PNG")
    recs = [Sample(key="same.key", image=png, ext="png", caption=str(i)) for i in range(3)]
    stats = write_shards(recs, tmp_path / "o", shard_size=10)
    keys = set(read_shards(tmp_path / "o"))
    assert stats["num_samples"] == 3 and len(keys) == 3


@pytest.mark.parametrize("argv,needle", [
    (["folder", "{tmp}/nope", "--out", "{tmp}/o"], "nope"),
    (["csv", "{tmp}/nope.csv", "--out", "{tmp}/o"], "nope.csv"),
    (["csv", "{table}", "--out", "{tmp}/o", "--caption-col", "text"], "no column 'text'"),
    (["folder", "{tmp}"], "--out"),
    (["folder", "{tmp}", "--out", "{tmp}/o", "--size", "0"], "positive"),
    (["emoji", "--out", "{tmp}/o", "--designs", "twemoji,clipart"], "clipart"),
    ([], "name a source"),
])
def test_cli_errors_exit_2_with_a_clear_message(tmp_path, capsys, argv, needle):
    table = tmp_path / "t.csv"
    table.write_text("image,caption\na.png,x\n")
    argv = [a.format(tmp=tmp_path, table=table) for a in argv]
    assert baton_main(["shards", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err
    assert not (tmp_path / "o").exists()  # nothing written on a bad command line
