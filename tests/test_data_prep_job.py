"""The shard job: shard size by bytes, dedupe, reruns, stale output, workers (see also the kill -9
and job-array test in test_data_prep_http.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from baton.cli import main as baton_main
from data_prep.writer import Sample, ShardFiles, tar_entry_bytes, tar_file_bytes


def _png(seed: int, size=(16, 16)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def tree(tmp_path) -> tuple[Path, list[tuple[str, bytes]]]:
    """3 classes x 7 files; some files are byte copies of others; one is broken. Returns the
    root and [(relative path, bytes)] in the folder source's (sorted) order."""
    root = tmp_path / "tree"
    files = []
    for c in ("ant", "bee", "cat"):
        for i in range(7):
            seed = {"ant": i % 4, "bee": (i + 2) % 4, "cat": 10 + i}[c]  # ant/bee share 4 images
            data = b"\x89PNG broken" if (c, i) == ("bee", 6) else _png(seed, size=(8 + 2 * seed % 7, 12))
            files.append((f"{c}/{i:02d}.png", data))
    for rel, data in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root, files


def _shards(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("shard-*.tar"))}


def _samples(d: Path) -> dict[str, dict]:
    stats = json.loads((d / "stats.json").read_text())
    urls = [str(d / s["name"]) for s in stats["shards"]]
    out = {}
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        assert s["__key__"] not in out
        out[s["__key__"]] = {k: v for k, v in s.items() if not k.startswith("__")}
    assert len(out) == stats["written"]
    return out


def test_shard_max_bytes_splits_into_pieces_with_the_same_samples(tree, tmp_path):
    root, _ = tree
    whole, pieces = tmp_path / "whole", tmp_path / "pieces"
    assert baton_main(["shards", "folder", str(root), "--out", str(whole), "--shard-size", "8"]) == 0
    limit = 2 * 10240
    assert baton_main(["shards", "folder", str(root), "--out", str(pieces), "--shard-size", "8",
                       "--shard-max-bytes", str(limit)]) == 0
    stats = json.loads((pieces / "stats.json").read_text())
    names = [s["name"] for s in stats["shards"]]
    assert len(names) > 3 and all(n.startswith(("shard-000000-", "shard-000001-", "shard-000002-")) for n in names)
    for s in stats["shards"]:
        size = (pieces / s["name"]).stat().st_size
        assert size == s["bytes"] and (size <= limit or s["count"] == 1)
    assert _samples(pieces) == _samples(whole)  # same samples, only cut differently
    # the size model the writer splits by is exact for webdataset's tars
    one = Sample("k", _png(1), "png", "caption", {"class": "x"})
    assert tar_file_bytes(tar_entry_bytes(one)) == len(_one_sample_tar(one, tmp_path))


def _one_sample_tar(sample: Sample, tmp_path: Path) -> bytes:
    d = tmp_path / "one"
    d.mkdir()
    files = ShardFiles(d, 0)
    files.add(sample)
    (shard,) = files.close()
    return (d / shard["name"]).read_bytes()


def test_dedupe_keeps_the_first_copy_in_input_order(tree, tmp_path):
    root, files = tree
    out = tmp_path / "out"
    assert baton_main(["shards", "folder", str(root), "--out", str(out), "--shard-size", "4", "--dedupe"]) == 0
    seen, expected = set(), []
    for rel, data in files:  # brute force: first occurrence of each byte string, decodable ones
        if data in seen:
            continue
        seen.add(data)
        if not data.startswith(b"\x89PNG broken"):
            expected.append(rel)
    got = sorted(json.loads(s["json"])["source"] for s in _samples(out).values())
    assert got == sorted(expected)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["skipped"] == {"duplicate": len(files) - len(seen), "undecodable_image": 1}
    assert stats["inputs"] == len(files)


def test_rerun_writes_nothing_and_changed_options_leave_no_stale_shards(tree, tmp_path, capsys):
    root, _ = tree
    out = tmp_path / "out"
    argv = ["shards", "folder", str(root), "--out", str(out), "--shard-size", "3"]
    assert baton_main(argv) == 0
    first = json.loads((out / "stats.json").read_text())
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    assert baton_main(argv) == 0
    again = json.loads((out / "stats.json").read_text())
    assert again["throughput"]["samples"] == 0  # nothing written: every shard was recorded
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")} == mtimes
    first.pop("throughput"), again.pop("throughput")
    assert again == first
    out_of_band = out / "shard-000003.tar"  # a shard damaged behind the job's back is rewritten
    out_of_band.write_bytes(b"damaged")
    assert baton_main(argv) == 0
    assert json.loads((out / "stats.json").read_text())["throughput"]["samples"] > 0
    ref = tmp_path / "ref"
    assert baton_main(["shards", "folder", str(root), "--out", str(ref), "--shard-size", "3"]) == 0
    assert _shards(out) == _shards(ref)
    assert baton_main([*argv[:-1], "10"]) == 0  # fewer, larger shards: the old ones are gone
    stats = json.loads((out / "stats.json").read_text())
    assert sorted(p.name for p in out.glob("shard-*.tar")) == [s["name"] for s in stats["shards"]]
    assert len(stats["shards"]) == 3
    assert sorted(p.name for p in (out / "_progress").iterdir()) == [f"chunk-{k:06d}.json" for k in range(3)]
    table = capsys.readouterr().out
    assert "samples/s" in table and "MB" in table


@pytest.mark.parametrize("bad,needle", [(["--part", "2/2"], "--part"), (["--part", "x"], "--part"),
                                        (["--jpeg-quality", "101"], "--jpeg-quality"),
                                        (["--workers", "0"], "--workers"),
                                        (["--shard-max-bytes", "100"], "--shard-max-bytes"),
                                        (["--min-caption-chars", "9", "--max-caption-chars", "3"], "caption")])
def test_bad_options_exit_2(tree, tmp_path, capsys, bad, needle):
    root, _ = tree
    assert baton_main(["shards", "folder", str(root), "--out", str(tmp_path / "o"), *bad]) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.slow
def test_workers_give_the_same_bytes_as_one_process(tree, tmp_path):
    root, _ = tree
    base = ["shards", "folder", str(root), "--shard-size", "2", "--dedupe", "--shard-max-bytes", "20480"]
    one, three = tmp_path / "one", tmp_path / "three"
    assert baton_main([*base, "--out", str(one)]) == 0
    assert baton_main([*base, "--out", str(three), "--workers", "3"]) == 0
    assert _shards(three) == _shards(one) and len(_shards(one)) > 5
    s1, s3 = (json.loads((d / "stats.json").read_text()) for d in (one, three))
    assert s3.pop("throughput")["workers"] == 3
    s1.pop("throughput")
    assert s1 == s3
