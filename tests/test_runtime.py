"""The shared runtime: typed configs, atomic checkpoints, the handoff format, the CLI."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from baton.checkpoint import latest_checkpoint, load_checkpoint, resolve_checkpoint, save_checkpoint
from baton.cli import main as cli_main
from baton.config import from_yaml, load_config, to_yaml
from baton.errors import BatonError
from baton.handoff import read_handoff, write_handoff


@dataclass
class _Optim:
    lr: float = 1e-3
    steps: int = 10


@dataclass
class _Cfg:
    name: str = "x"
    optim: _Optim = field(default_factory=_Optim)


def test_config_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: demo\noptim:\n  lr: 0.5\n")
    cfg = load_config(_Cfg, p, ["optim.steps=7"])
    assert (cfg.name, cfg.optim.lr, cfg.optim.steps) == ("demo", 0.5, 7)
    assert from_yaml(_Cfg, to_yaml(cfg)) == cfg


def test_config_unknown_key_names_key_and_choices(tmp_path):
    with pytest.raises(BatonError) as e:
        load_config(_Cfg, None, ["optim.lrr=0.1"])
    msg = str(e.value)
    assert "optim.lrr" in msg and "lr" in msg and "steps" in msg and "Did you mean 'lr'" in msg
    p = tmp_path / "c.yaml"
    p.write_text("nmae: demo\n")
    with pytest.raises(BatonError) as e:
        load_config(_Cfg, p)
    assert "nmae" in str(e.value) and str(p) in str(e.value) and "name" in str(e.value)


def test_config_wrong_type_and_missing_file(tmp_path):
    with pytest.raises(BatonError) as e:
        load_config(_Cfg, None, ["optim.steps=many"])
    assert "optim.steps" in str(e.value)
    with pytest.raises(BatonError) as e:
        load_config(_Cfg, tmp_path / "nope.yaml")
    assert "nope.yaml" in str(e.value)


def test_config_base_chain_merges_bases_first_and_reports_loops_and_missing_files(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "root.yaml").write_text("name: root\noptim:\n  lr: 0.5\n  steps: 3\n")
    (tmp_path / "recipes" / "mid.yaml").write_text("base: ../root.yaml\noptim:\n  steps: 5\n")
    (tmp_path / "recipes" / "leaf.yaml").write_text("base: mid.yaml   # relative to this file\nname: leaf\n")
    cfg = load_config(_Cfg, tmp_path / "recipes" / "leaf.yaml", ["optim.lr=0.25"])
    assert (cfg.name, cfg.optim.lr, cfg.optim.steps) == ("leaf", 0.25, 5)   # leaf > mid > root; overrides last
    assert load_config(_Cfg, tmp_path / "recipes" / "mid.yaml") == _Cfg("root", _Optim(0.5, 5))

    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(BatonError, match="loops back"):
        load_config(_Cfg, tmp_path / "a.yaml")
    (tmp_path / "orphan.yaml").write_text("base: gone.yaml\n")
    with pytest.raises(BatonError, match=r"gone\.yaml.*the `base:` of .*orphan\.yaml"):
        load_config(_Cfg, tmp_path / "orphan.yaml")
    (tmp_path / "typo.yaml").write_text("base: root.yaml\noptim:\n  lrr: 1\n")
    with pytest.raises(BatonError, match="optim.lrr"):
        load_config(_Cfg, tmp_path / "typo.yaml")


def test_setup_logging_again_closes_the_previous_log_file(tmp_path):
    import logging

    from baton.logs import setup_logging

    setup_logging(tmp_path / "a")
    first = next(h for h in logging.getLogger("baton").handlers if isinstance(h, logging.FileHandler))
    logging.getLogger("baton").info("stage a")
    setup_logging(tmp_path / "b")           # the next stage in the same process (the pipeline test does this)
    logging.getLogger("baton").info("stage b")
    assert first.stream is None             # closed, not leaked
    assert "stage a" in (tmp_path / "a" / "log.txt").read_text()
    assert "stage b" in (tmp_path / "b" / "log.txt").read_text() and "stage a" not in (tmp_path / "b" / "log.txt").read_text()
    setup_logging(None)


def test_checkpoint_atomic_latest_and_pruning(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        save_checkpoint(root, step, {"w": torch.full((2,), float(step)), "step": step}, keep_last=2)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000003", "step_000004"]
    assert not list(root.glob(".*tmp"))
    state, meta = load_checkpoint(tmp_path)  # a run directory works too
    assert state["step"] == 4 and meta["step"] == 4 and torch.equal(state["w"], torch.full((2,), 4.0))
    assert resolve_checkpoint(root / "step_000003").name == "step_000003"


def test_checkpoint_missing_is_clear(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(BatonError) as e:
        resolve_checkpoint(tmp_path / "run")
    assert "no checkpoint found" in str(e.value) and "run" in str(e.value)


class _Arbitrary:
    """An arbitrary class: loading a checkpoint must not unpickle it."""


def test_checkpoint_refuses_pickled_objects(tmp_path):
    save_checkpoint(tmp_path, 1, {"obj": _Arbitrary()})
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_checkpoint(tmp_path)


def test_handoff_round_trip_and_tamper(tmp_path):
    sd = {"a.weight": torch.randn(3, 4), "a.bias": torch.randn(3)}
    write_handoff(tmp_path, sd, {"library": "open_clip", "embedding_dim": 3})
    back, meta = read_handoff(tmp_path)
    assert all(torch.equal(back[k], sd[k]) for k in sd) and meta["embedding_dim"] == 3
    with open(tmp_path / "backbone.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(BatonError, match="sha256"):
        read_handoff(tmp_path)
    with pytest.raises(BatonError, match="baton export"):
        read_handoff(tmp_path / "missing")


def test_cli_unknown_command(capsys):
    assert cli_main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert cli_main(["--help"]) == 0
    assert "pretrain" in capsys.readouterr().out


def test_config_changes_on_resume():
    from baton.run import config_changes

    saved = to_yaml(_Cfg(name="a"))
    assert config_changes(saved, _Cfg(name="a")) == []
    changes = config_changes(saved, _Cfg(name="a", optim=_Optim(lr=0.5)))
    assert changes == ["optim.lr: 0.001 -> 0.5"]
    assert config_changes(saved, _Cfg(name="b"), ignore=("name",)) == []


def test_metrics_go_to_wandb_when_asked_and_fail_clearly_without_it(tmp_path, monkeypatch):
    import sys
    import types

    from baton.errors import BatonError
    from baton.logs import MetricsWriter, read_metrics

    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(BatonError, match="pip install wandb"):
        MetricsWriter(tmp_path / "a", wandb_project="baton")
    calls = []

    class FakeRun:
        def log(self, row, step):
            calls.append(("log", row, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or FakeRun())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    w = MetricsWriter(tmp_path / "run1", tensorboard=False, wandb_project="baton", config={"lr": 1})
    w.log(3, loss=0.5)
    w.close()
    assert calls[0][0] == "init" and calls[0][1]["project"] == "baton" and calls[0][1]["resume"] == "allow"
    from baton.logs import wandb_run_id

    assert calls[0][1]["config"] == {"lr": 1} and calls[0][1]["id"] == wandb_run_id(tmp_path / "run1")
    assert wandb_run_id(tmp_path / "run1").startswith("run1-") and wandb_run_id(tmp_path / "run1") == \
        wandb_run_id(str(tmp_path / "x" / ".." / "run1"))                       # the same directory: the same id
    assert wandb_run_id(tmp_path / "a" / "pretrain") != wandb_run_id(tmp_path / "b" / "pretrain")
    assert calls[1:] == [("log", {"loss": 0.5}, 3), ("finish",)]
    assert read_metrics(tmp_path / "run1" / "metrics.jsonl")[0]["loss"] == 0.5
    assert MetricsWriter(tmp_path / "off", enabled=False, wandb_project="baton")._wandb is None  # rank != 0


def test_a_metrics_row_cut_short_is_ended_on_resume_and_skipped_when_read(tmp_path, caplog):
    """A kill -9 in the middle of a metrics.jsonl row: the resumed run's rows start on a line of their
    own, and the readers (`baton report --loss-curve`, ...) skip the broken line with a warning
    naming the file and line, keeping every other row."""
    from baton.logs import MetricsWriter, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    MetricsWriter(tmp_path, tensorboard=False).log(3, loss=1.5)
    (tmp_path / "other.jsonl").write_bytes(b'{"step": 1}\n[1, 2]\n\xff\xfe\n')
    logging.getLogger("baton").addHandler(caplog.handler)
    try:
        rows = read_metrics(path)
        assert read_metrics(tmp_path / "other.jsonl") == [{"step": 1}]
    finally:
        logging.getLogger("baton").removeHandler(caplog.handler)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 2.0), (3, 1.5)]
    assert f"{path}: skipped 1 line(s) that are not json objects (line 2)" in caplog.text
    assert "(line 2, 3)" in caplog.text


def test_a_recipe_or_section_of_the_wrong_shape_and_a_non_finite_number_are_named(tmp_path):
    """YAML that is a list, `data: 5` in a recipe or `data=5` on the command line, and `optim.lr=inf`:
    each an error naming the file or override and the key, not a TypeError or "config key ''"."""
    from pretrain.config import PretrainConfig

    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(BatonError, match=r"list.yaml: a recipe is a YAML mapping of keys .* not a list"):
        load_config(PretrainConfig, listed)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("method: glip\nglip:\n  eval: 3\n")
    with pytest.raises(BatonError, match=r"scalar.yaml: glip.eval is a section \(keys batch_size, .*not 3"):
        load_config(PretrainConfig, scalar)
    with pytest.raises(BatonError, match=r"override 'data=5': data is a section \(keys batch_size,"):
        load_config(PretrainConfig, None, ["data=5"])
    with pytest.raises(BatonError, match=r"optim.lr=inf is out of range: it must be a finite number"):
        load_config(PretrainConfig, None, ["optim.lr=inf"])
