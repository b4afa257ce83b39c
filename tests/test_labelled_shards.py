"""The one labelled-shard reader (`pretrain.data.labelled`) in every stage: finetuning's shards
source (training set and `baton evaluate`) skips and counts a bad sample or a truncated shard,
naming the shard, and fails past `data.max_skipped_fraction`; pretraining's held-out evaluation
and finetuning read the same samples from the same shards, also over http."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from baton.cli import main as cli_main
from baton.errors import BatonError
from conftest import make_synthetic_shards
from finetune.datasets import load_dataset

RECIPE = str(Path(__file__).resolve().parents[1] / "configs" / "demo_softtriple.yaml")


@pytest.fixture
def baton_log(caplog):
    """caplog for the `baton` loggers even after `setup_logging` stopped them propagating."""
    logger = logging.getLogger("baton")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING)
    yield caplog
    logger.removeHandler(caplog.handler)


def shard_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers() if m.isfile()]


def rewrite_shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def replace_member(path: Path, suffix: str, data: bytes, nth: int = 0) -> str:
    """Replace the `nth` member ending in `suffix` of the shard at `path`; returns its sample key."""
    members = shard_members(path)
    names = [n for n, _ in members if n.endswith(suffix)]
    target = names[nth]
    rewrite_shard(path, [(n, data if n == target else d) for n, d in members])
    return target[: -len(suffix)]


def make_root(root: Path, train_per_class: int = 4, test_per_class: int = 2) -> Path:
    make_synthetic_shards(root / "train", per_class=train_per_class, seed=0)
    make_synthetic_shards(root / "test", per_class=test_per_class, seed=1)
    return root


def test_a_corrupt_png_in_a_finetune_shard_is_skipped_counted_and_the_rest_trains(tmp_path, baton_log, capsys):
    from test_finetune import overrides, write_tiny_handoff

    root = make_root(tmp_path / "data", train_per_class=7)          # 112 training samples, 7 shards
    shard = root / "train" / "shard-000003.tar"
    key = replace_member(shard, ".png", b"\x89PNG\r\n\x1a\n not an image")
    split = load_dataset("shards", root)
    assert len(split.train) == 111 and len(split.test) == 32        # 1/112 < the default 1 %
    assert key not in {n for _, _, n in split.train} and f"{key} in {shard}" in baton_log.text
    assert "bad_image" in baton_log.text
    from pretrain.data.labelled import read_labelled

    data = read_labelled(str(root / "train"), caption_required=False, class_required=True)
    assert len(data.decode_owned()) == 111 and data.skipped == {"bad_image": 1}
    assert data.skipped_fraction() == 1 / 112
    data.check_skipped(1 / 112, "train")                              # at the limit: counted, not fatal
    with pytest.raises(BatonError, match=rf"0\.9% .*{shard} \(1\)"):
        data.check_skipped(0.008, "train")

    handoff = write_tiny_handoff(tmp_path / "handoff")
    args = overrides(tmp_path, handoff, "run", "train.epochs=1", "train.steps_per_epoch=2", "train.eval_at_end=false")
    assert cli_main(["finetune", RECIPE, *args]) == 0
    err = capsys.readouterr().err
    assert str(shard) in err and "bad_image" in err
    assert (tmp_path / "run" / "checkpoints" / "step_000002").is_dir()


def test_a_truncated_train_shard_is_reported_naming_the_shard(tmp_path, baton_log):
    root = make_root(tmp_path / "data")                              # 64 training samples, 4 shards of 16
    shard = root / "train" / "shard-000002.tar"
    full = shard.read_bytes()
    shard.write_bytes(full[: len(full) // 2 + 100])                   # cut inside a member: a read error
    with pytest.raises(BatonError, match=r"data\.max_skipped_fraction.*shard-000002\.tar"):
        load_dataset("shards", root)
    split = load_dataset("shards", root, max_skipped_fraction=0.5)
    assert 48 <= len(split.train) <= 56 and "unreadable_shard" in baton_log.text and str(shard) in baton_log.text

    with tarfile.open(fileobj=io.BytesIO(full)) as t:                # cut at a member boundary: no read error,
        offset = [m for m in t.getmembers()][3 * 8].offset           # 8 whole samples of 16 left
    shard.write_bytes(full[:offset])
    baton_log.clear()
    with pytest.raises(BatonError, match=r"12\.5%.*shard-000002\.tar \(8\)"):
        load_dataset("shards", root)
    assert len(load_dataset("shards", root, max_skipped_fraction=0.2).train) == 56
    assert f"shard {shard} held 8 samples, but its stats.json lists 16" in baton_log.text


def test_past_the_threshold_finetune_and_evaluate_fail_with_a_clear_error(tmp_path, capsys):
    root = make_root(tmp_path / "data")
    shard = root / "test" / "shard-000001.tar"                       # 32 held-out samples
    replace_member(shard, ".json", b"{not json")
    replace_member(shard, ".json", json.dumps({"design": "no class"}).encode(), nth=1)
    evaluate = ["evaluate", "pixels", "--data-source", "shards", "--data-root", str(root), "--out", str(tmp_path / "ev")]
    assert cli_main(evaluate) == 2
    err = capsys.readouterr().err
    assert "6.2% of the samples were skipped" in err and f"{shard} (2)" in err and "Traceback" not in err
    assert "'bad_json': 1" in err and "'missing_class': 1" in err
    assert cli_main([*evaluate, "--max-skipped-fraction", "0.1"]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["n_images"] == 30
    assert cli_main(["finetune", RECIPE, f"run_dir={tmp_path / 'run'}", f"data.root={root}", "backbone=none"]) == 2
    assert "more than 0.01 (data.max_skipped_fraction" in capsys.readouterr().err


def check_same_samples(root: str, held_out: Path) -> None:
    """Finetuning's test split of `root` holds pretraining's samples of `held_out`, in its order."""
    from pretrain.data import decode_image
    from pretrain.data.labelled import read_labelled

    pretrain_set = read_labelled(str(held_out))                       # as eval.shards / dino.knn_shards
    decoded = [(s, decode_image(s.image)) for s in pretrain_set.samples]   # as pretrain/clip/evaluation.py
    test = load_dataset("shards", root).test
    assert [n for _, _, n in test] == [s.label for s, _ in decoded] and len(test) == 32
    for (img, _, _), (_, want) in zip(test, decoded):
        np.testing.assert_array_equal(np.asarray(img), np.asarray(want))


def test_pretraining_and_finetuning_read_the_same_held_out_samples(tmp_path):
    root = make_root(tmp_path / "data")
    shard = root / "test" / "shard-000000.tar"
    clear = Image.new("RGBA", (32, 32), (0, 0, 0, 0))                 # fully transparent: white in both
    buf = io.BytesIO()
    clear.save(buf, format="PNG")
    replace_member(shard, ".png", buf.getvalue())                     # the first sample of the first shard
    check_same_samples(str(root), root / "test")
    test = load_dataset("shards", root).test
    assert [n for _, _, n in test] != sorted(n for _, _, n in test)   # shard order, not sorted
    assert np.asarray(test[0][0]).min() == 255                      # the transparent image, on white


def test_finetuning_reads_shards_over_http(tmp_path):
    import socket
    import subprocess
    import sys
    import time

    root = make_root(tmp_path / "data")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                              cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        url = f"http://127.0.0.1:{port}"
        remote, local = load_dataset("shards", url), load_dataset("shards", root)
        assert [n for _, _, n in remote.train] == [n for _, _, n in local.train] and len(remote.train) == 64
        check_same_samples(url, root / "test")
    finally:
        server.terminate()
        server.wait(timeout=10)
