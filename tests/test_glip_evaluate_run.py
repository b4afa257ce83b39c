"""GLIP's held-out scenes through the shared shard reader, and `baton evaluate` of a GLIP run.

The reader (`read_labelled(grounding=True)`): a corrupt scene (an undecodable image, a record that
is not JSON, a region without a box) is skipped and counted, naming its shard; past
glip.eval.max_skipped_fraction evaluation stops naming the shard; two ranks split the scenes and sum
what each skipped. `baton evaluate GLIP_RUN` writes what `evaluate_glip` gives for the run's model
with the flags' values, from a run directory or its export, and refuses the retrieval flags (and
the GLIP flags for other models) by name."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from baton.cli import main as cli_main
from baton.errors import BatonError
from test_glip import tiny_glip
from test_glip_engine import make_grounding_shards, run_engine
from test_labelled_shards import replace_member, shard_members

BAD = "shard-000001.tar"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_grounding_shards(tmp_path_factory.mktemp("scenes"), n=48)


@pytest.fixture(scope="module")
def corrupt(shards, tmp_path_factory) -> tuple[Path, set[str]]:
    """The scenes with three bad ones in shard 1: a truncated PNG and a region without a box (found
    by the rank that decodes the scene), a record that is not JSON (found by every rank)."""
    out = tmp_path_factory.mktemp("corrupt") / "scenes"
    shutil.copytree(shards, out)
    tar = out / BAD
    png = dict(shard_members(tar))
    keys = {replace_member(tar, ".png", png[sorted(png)[0]][:60], nth=0)}
    keys.add(replace_member(tar, ".json", b"{not json", nth=3))
    members = dict(shard_members(tar))
    name = sorted(n for n in members if n.endswith(".json"))[5]
    rec = json.loads(members[name])
    del rec["regions"][0]["bbox"]
    keys.add(replace_member(tar, ".json", json.dumps(rec).encode(), nth=5))
    return out, keys


def glip_method(eval_shards, **eval_keys):
    from baton.distributed import DistInfo
    from pretrain.config import PretrainConfig
    from pretrain.glip.method import GlipMethod

    cfg = PretrainConfig(method="glip")
    cfg.glip = tiny_glip()
    cfg.glip.eval.shards, cfg.glip.eval.batch_size = str(eval_shards), 16
    for k, v in eval_keys.items():
        setattr(cfg.glip.eval, k, v)
    return GlipMethod(cfg, DistInfo())


def reference_regions(shards: Path, skip: set[str] = frozenset(), first: int | None = None) -> int:
    """Regions of the scenes, read with tarfile and mapped one by one (no shard reader)."""
    from pretrain.glip.data import GroundingSample
    from pretrain.glip.model import build_tokenizer

    cfg = tiny_glip()
    mapper, total, seen = GroundingSample(cfg, build_tokenizer(cfg)), 0, 0
    for tar in sorted(shards.glob("*.tar")):
        members = dict(shard_members(tar))
        for key in sorted({n.rsplit(".", 1)[0] for n in members}):
            if key in skip or (first is not None and seen >= first):
                continue
            seen += 1
            total += int(mapper({"png": members[f"{key}.png"], "json": members[f"{key}.json"]}, 0)[4].sum())
    return total


def test_a_corrupt_scene_is_skipped_counted_and_past_the_limit_stops_naming_the_shard(shards, corrupt, caplog):
    from pretrain.glip.evaluation import evaluate_glip

    bad_dir, bad_keys = corrupt
    torch.manual_seed(0)
    model = glip_method(shards).build_model().eval()
    clean = evaluate_glip(model, glip_method(shards), torch.device("cpu"))
    assert clean["grounding_regions"] == reference_regions(shards) and clean["grounding_skipped"] == 0

    logging.getLogger("baton").addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING):
            got = evaluate_glip(model, glip_method(bad_dir, max_skipped_fraction=0.1), torch.device("cpu"))
    finally:
        logging.getLogger("baton").removeHandler(caplog.handler)
    assert got["grounding_skipped"] == 3
    assert got["grounding_regions"] == reference_regions(shards, skip=bad_keys)
    warned = {r.getMessage() for r in caplog.records if "skipped sample" in r.getMessage()}   # once per handler
    assert len(warned) == 3 and all(BAD in w for w in warned)
    assert {w.split("skipped sample ")[1].split()[0] for w in warned} == bad_keys
    assert sum("bad_image" in w for w in warned) == 1 and sum("bad_json" in w for w in warned) == 2

    with pytest.raises(BatonError) as e:   # 3 of 48 > the default 1 %
        evaluate_glip(model, glip_method(bad_dir), torch.device("cpu"))
    assert BAD in str(e.value) and "glip.eval.max_skipped_fraction" in str(e.value)
    assert "'bad_image': 1" in str(e.value) and "'bad_json': 2" in str(e.value)


def test_two_ranks_split_the_scenes_and_sum_their_skips(shards, corrupt, monkeypatch):
    import pretrain.data.labelled as labelled
    from pretrain.glip.evaluation import read_eval_set

    clean = glip_method(shards)
    one = [row for row, _ in read_eval_set(clean, 0, 1)[0]]
    for r in (0, 1):                     # rank r holds scenes r, r + 2, ... of the one-process order
        part = [row for row, _ in read_eval_set(clean, r, 2)[0]]
        assert len(part) == len(one[r::2]) == 24
        assert all(torch.equal(a, b) for got, want in zip(part, one[r::2]) for a, b in zip(got, want))
    bad_dir, _ = corrupt
    method = glip_method(bad_dir, max_skipped_fraction=0.1)
    _, one_set = read_eval_set(method, 0, 1)
    assert one_set.check_skipped_over_ranks(0.1, "glip.eval.shards") == Counter({"bad_json": 2, "bad_image": 1})
    parts = [read_eval_set(method, r, 2) for r in (0, 1)]
    assert sum(len(scenes) for scenes, _ in parts) == 45
    # with the ranks' counts gathered, each rank reaches the one-process total
    owned = [(dict(s.owner_progress.rejected), dict(s.owner_bad_by_shard)) for _, s in parts]
    monkeypatch.setattr(labelled, "all_gather_object", lambda obj: owned)
    totals = [s.check_skipped_over_ranks(0.1, "glip.eval.shards") for _, s in parts]
    assert totals[0] == totals[1] == Counter({"bad_json": 2, "bad_image": 1})
    assert sum(s.owner_progress.rejected.total() for _, s in parts) == 2    # found by the decoding ranks only
    with pytest.raises(BatonError, match=BAD):
        parts[1][1].check_skipped_over_ranks(0.01, "glip.eval.shards")


# ------------------------------------------------------------------ baton evaluate GLIP_RUN

@pytest.fixture(scope="module")
def glip_run(shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("glip") / "run"
    assert run_engine(shards, run, "train.max_steps=3", "train.epochs=1", f"glip.eval.shards={shards}") == 0
    return run


def reference_scores(run: Path, shards, **changes) -> dict:
    """evaluate_glip on the run's model, its config changed as the flags say."""
    from pretrain.glip.evaluation import evaluate_glip
    from pretrain.glip.ground import load_run

    method, model = load_run(run)
    method.glip.eval.shards, method.glip.eval.max_samples = str(shards), None
    for key, value in changes.items():
        *path, name = key.split(".")
        node = method.cfg
        for part in path:
            node = getattr(node, part)
        setattr(node, name, value)
    return evaluate_glip(model, method, torch.device("cpu"))


def evaluate(*args: str) -> int:
    return cli_main(["evaluate", *args])


def test_evaluate_a_glip_run_writes_its_grounding_and_detection_scores(glip_run, shards, tmp_path, capsys):
    pytest.importorskip("torchmetrics")
    assert evaluate(str(glip_run), "--out", str(tmp_path / "own")) == 0     # the run's own glip.eval.shards
    got = json.loads((tmp_path / "own" / "metrics.json").read_text())
    want = reference_scores(glip_run, shards)
    assert {k: got[k] for k in want} == want
    assert "zero_shot_map" in want and want["grounding_regions"] == reference_regions(shards)
    assert got["step"] == 3 and got["checkpoint"].endswith("step_000003") and got["shards"] == str(shards)
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["grounding_r1"] == round(want["grounding_r1"], 4)


def test_every_glip_flag_takes_effect(glip_run, shards, corrupt, tmp_path, capsys, monkeypatch):
    import pretrain.glip.evaluation as evaluation

    seen, real = [], evaluation.grounding_recall

    def spy(model, rows, batch_size, device, nms_iou):   # what the scoring was called with
        seen.append((len(rows), batch_size, nms_iou))
        return real(model, rows, batch_size, device, nms_iou)

    monkeypatch.setattr(evaluation, "grounding_recall", spy)
    out = tmp_path / "flags"
    assert evaluate(str(glip_run), "--shards", str(shards), "--max-samples", "16", "--detection-classes", "0",
                    "--nms-iou", "0.3", "--batch-size", "5", "--device", "cpu", "--out", str(out)) == 0
    got = json.loads((out / "metrics.json").read_text())
    want = reference_scores(glip_run, shards, **{"glip.eval.max_samples": 16, "glip.detection_classes": 0,
                                                 "glip.nms_iou": 0.3})
    assert {k: got[k] for k in want} == want and "zero_shot_map" not in got
    assert seen[0] == (16, 5, 0.3) and seen[1][::2] == (16, 0.3)     # the CLI's call, then the reference's
    assert got["grounding_regions"] == reference_regions(shards, first=16)
    assert "glip.nms_iou=0.3" in got["overrides"] and "glip.eval.batch_size=5" in got["overrides"]
    bad_dir, _ = corrupt
    assert evaluate(str(glip_run), "--shards", str(bad_dir), "--detection-classes", "0", "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert BAD in err and "--max-skipped-fraction" in err and "--shards=" in err
    assert evaluate(str(glip_run), "--shards", str(bad_dir), "--detection-classes", "0",
                    "--max-skipped-fraction", "0.1", "--out", str(out)) == 0
    assert json.loads((out / "metrics.json").read_text())["grounding_skipped"] == 3


def test_retrieval_flags_are_refused_for_a_glip_run_and_glip_flags_for_other_models(glip_run, shards, tmp_path, capsys):
    for flags, named in ((["--data-root", "data/emoji"], "--data-root"), (["--seed", "1"], "--seed"),
                         (["--split", "train", "--no-grid"], "--no-grid, --split"),
                         (["--save-embeddings"], "--save-embeddings")):
        assert evaluate(str(glip_run), *flags, "--out", str(tmp_path / "x")) == 2
        err = capsys.readouterr().err
        assert f"error: {named}: not for a GLIP run" in err and "baton export" in err, err
    assert not (tmp_path / "x").exists()
    assert evaluate("pixels", "--shards", str(shards), "--data-root", "d", "--out", str(tmp_path / "y")) == 2
    assert "--shards: only for a GLIP run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate(str(glip_run), "--nms-iou", "0", "--out", str(tmp_path / "x"))
    assert "--nms-iou: must be a float > 0.0 and <= 1.0" in capsys.readouterr().err
    with pytest.raises(SystemExit):   # no prefix matching: --shard is not --shards
        evaluate(str(glip_run), "--shard", str(shards), "--out", str(tmp_path / "x"))


def test_evaluate_a_glip_export_scores_the_checkpoint_it_came_from(glip_run, shards, tmp_path, capsys):
    from pretrain.export import export

    exported = export(glip_run, tmp_path / "export")
    flags = ["--shards", str(shards), "--detection-classes", "0"]
    assert evaluate(str(glip_run), *flags, "--out", str(tmp_path / "run")) == 0
    assert evaluate(str(exported), *flags, "--out", str(tmp_path / "exp")) == 0
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("run", "exp"))
    assert a["grounding_r1"] == b["grounding_r1"] and a["grounding_r5"] == b["grounding_r5"]
    assert b["model_spec"] == str(exported) and b["checkpoint"] == a["checkpoint"]
    step_dir = Path(b["checkpoint"])
    shutil.move(step_dir, tmp_path / "elsewhere")
    try:
        assert evaluate(str(exported), *flags, "--out", str(tmp_path / "gone")) == 2
        err = capsys.readouterr().err
        assert "holds the image backbone only" in err and str(step_dir) in err
    finally:
        shutil.move(tmp_path / "elsewhere", step_dir)
