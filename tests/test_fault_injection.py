"""Every stage over the generated corrupt-input corpus (tests/corrupt_corpus.py): each bad input is
skipped with its reason counted, or refused with a message naming it; never a traceback, a hang
or a silently wrong count. The kill -9 and checkpoint-write faults are in tests/test_kill_points.py."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from baton.errors import BatonError
from corrupt_corpus import BAD_FILES, BAD_SAMPLES, write_bad_shards, write_class_folders

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def class_folders(tmp_path) -> tuple[Path, dict]:
    root = tmp_path / "tree"
    expected = write_class_folders(root)
    (root / "split.json").write_text(json.dumps({"train": ["c0", "c1"], "test": ["c2", "c3"]}))
    return root, expected


def test_baton_shards_folder_counts_every_bad_file(class_folders, tmp_path):
    root, expected = class_folders
    out = tmp_path / "shards"
    done = subprocess.run([sys.executable, "-m", "baton", "shards", "folder", str(root), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["written"] == expected["good"]
    assert stats["skipped"] == {**expected["bad"], "outside_class_folder": 1}   # split.json itself


def test_finetune_folder_source_skips_and_counts_every_bad_file(class_folders, caplog):
    from finetune.datasets import load_dataset

    root, expected = class_folders
    with caplog.at_level(logging.WARNING, logger="baton"):
        split = load_dataset("folder", root, max_skipped_fraction=0.5)
    assert len(split.train) + len(split.test) == expected["good"]
    for name in BAD_FILES:
        assert name in caplog.text, name                   # each bad file is named
    assert str(dict(sorted(expected["bad"].items()))) in caplog.text
    with pytest.raises(BatonError, match=r"data.root=.*train split.*more than 0.01 \(data.max_skipped_fraction.*"
                                         r"by reason: .*undecodable_image.*c0/"):
        load_dataset("folder", root)                        # the default limit: 1 %


def test_a_benchmark_layout_checks_its_listed_files_when_loaded(tmp_path, caplog):
    """SOP keeps paths and decodes when used: a listed file that is missing, truncated or not an
    image is found when the split is loaded, not in the middle of training."""
    from corrupt_corpus import jpeg_bytes

    from finetune.datasets import load_dataset

    root = tmp_path / "Stanford_Online_Products"
    header = "image_id class_id super_class_id path\n"
    rows = {"Ebay_train.txt": [(i, 1 + i // 4, 1, f"bicycle_final/{i}.JPG") for i in range(12)],
            "Ebay_test.txt": [(i, 100 + i // 4, 2, f"sofa_final/{i}.JPG") for i in range(12, 20)]}
    for name, listed in rows.items():
        for r in listed:
            (root / r[3]).parent.mkdir(parents=True, exist_ok=True)
            (root / r[3]).write_bytes(jpeg_bytes(r[0]))
        (root / name).write_text(header + "".join(" ".join(map(str, r)) + "\n" for r in listed))
    whole = (root / "bicycle_final/3.JPG").read_bytes()
    (root / "bicycle_final/3.JPG").write_bytes(whole[: len(whole) // 2])
    (root / "bicycle_final/5.JPG").unlink()
    (root / "sofa_final/13.JPG").write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="baton"):
        split = load_dataset("sop", tmp_path, max_skipped_fraction=0.2)
    assert len(split.train) == 10 and len(split.test) == 7
    assert all(Path(p).name not in ("3.JPG", "5.JPG", "13.JPG") for p, _, _ in split.train + split.test)
    assert "bicycle_final/3.JPG" in caplog.text and "missing_file" in caplog.text
    with pytest.raises(BatonError, match=r"train split.*16.7% of the samples.*more than 0.1"):
        load_dataset("sop", tmp_path, max_skipped_fraction=0.1)


@pytest.mark.parametrize("reader", ["finetune", "clip_eval"])
def test_labelled_shard_readers_count_every_bad_sample_by_reason(tmp_path, reader):
    from pretrain.data.labelled import read_labelled

    shards = tmp_path / "bad"
    corpus = write_bad_shards(shards)
    good, before_cut = corpus["good_per_shard"], corpus["read_before_cut"]
    finetune = reader == "finetune"
    data = read_labelled(str(shards), caption_required=not finetune, class_required=finetune)
    images = data.decode_owned()
    reasons = [f if finetune else e for f, e in BAD_SAMPLES.values()]
    expected = {r: 1 for r in reasons if r} | {"unreadable_shard": 1}
    assert dict(data.skipped) == expected
    assert len(images) == good + reasons.count(None) + before_cut
    assert data.read == good + len(BAD_SAMPLES) + before_cut and data.lost == good - before_cut
    assert data.skipped_fraction() == (len(expected) - 1 + good - before_cut) / (data.read + data.lost)
    with pytest.raises(BatonError, match=r"more than 0.01 \(data.max_skipped_fraction\).*shard-000001\.tar \(6\)"):
        data.check_skipped(0.01, "where")


def test_pretraining_eval_shards_fail_past_the_skipped_fraction(tmp_path, synthetic_shards, capsys):
    from baton.cli import main as cli_main
    from baton.logs import read_metrics
    from test_pretrain import write_tiny_config

    bad = tmp_path / "bad"
    write_bad_shards(bad)
    cfg = write_tiny_config(tmp_path / "c.yaml", tmp_path / "run", synthetic_shards,
                            train={"max_steps": 1, "eval_every": 1}, clip={"eval": {"shards": str(bad), "batch_size": 8}})
    assert cli_main(["pretrain", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "more than 0.01 (clip.eval.max_skipped_fraction)" in err and "shard-000001.tar" in err
    assert "Traceback" not in err
    assert cli_main(["pretrain", str(cfg), f"run_dir={tmp_path / 'lenient'}", "clip.eval.max_skipped_fraction=0.9"]) == 0
    row = [r for r in read_metrics(tmp_path / "lenient" / "metrics.jsonl") if "eval/skipped" in r][-1]
    assert row["eval/skipped"] == sum(1 for _, e in BAD_SAMPLES.values() if e) + 1   # + the unreadable shard


@pytest.mark.parametrize("sep, name", [(",", "pairs.csv"), ("\t", "pairs.tsv")])
def test_baton_shards_table_counts_every_bad_row_and_file(class_folders, tmp_path, sep, name):
    """The table source over the corpus's files (every bad image listed as a row) and every kind
    of bad row: each skipped and counted by its reason, the good rows written, no traceback."""
    root, expected = class_folders
    files = sorted(p for p in root.rglob("*") if p.parent != root)          # folder.png too: a folder
    rows = [f"{p.relative_to(tmp_path)}{sep}a picture of {p.parent.name}".encode() for p in files]
    good_rows = [f'tree/c1/0.png{sep}"a caption on two lines{sep}\nwith the separator"'.encode(),
                 f"tree/c1/1.png{sep}trailing empty cells{sep}{sep}".encode()]
    bad_rows = {"missing_image_path": [f"{sep}no image".encode()],
                "empty_caption": [f"tree/c1/2.png{sep}".encode(), b"tree/c1/3.png"],
                "malformed_row": [f"tree/c1/4.png{sep}a caption{sep}with an unquoted separator".encode(),
                                  f'tree/c1/5.png{sep}"closed"early'.encode()],
                "undecodable_row": [f"tree/c2/0.png{sep}caf".encode() + b"\xe9 latin-1"],
                "unreadable_file": [f"tree/c2/1\0.png{sep}a NUL in the path".encode()],
                "missing_file": [f"tree/c2/nowhere.png{sep}gone".encode()],
                "not_a_file": [f"tree/c3{sep}a class folder".encode()]}
    table = tmp_path / name
    table.write_bytes(b"\n".join([f"image{sep}caption".encode(), *rows, *good_rows,
                                  *[r for rs in bad_rows.values() for r in rs]]) + b"\n")
    out = tmp_path / "shards"
    done = subprocess.run([sys.executable, "-m", "baton", "shards", "table", str(table), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    stats = json.loads((out / "stats.json").read_text())
    want = dict(expected["bad"])
    want["not_a_file"] += 1                                  # folder.png, listed as an image
    for reason, listed in bad_rows.items():
        want[reason] = want.get(reason, 0) + len(listed)
    assert stats["skipped"] == dict(sorted(want.items()))
    assert stats["written"] == expected["good"] + len(good_rows)

    # a quote never closed would make every later line one cell: the table is refused, naming the line
    table.write_bytes(b"\n".join([f"image{sep}caption".encode(), *rows[:3], f'tree/c1/0.png{sep}"open'.encode(),
                                  *rows[3:]]) + b"\n")
    done = subprocess.run([sys.executable, "-m", "baton", "shards", "table", str(table), "--out",
                           str(tmp_path / "refused")], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"{table}: the quote opened on line 5 is never closed" in done.stderr
    assert not (tmp_path / "refused").exists()
