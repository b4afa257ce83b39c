"""`baton STAGE --help` lists the config keys with defaults and comments; `--print-config` prints
the resolved config and exits 0 without doing work."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from baton.cli import main as cli
from baton.cli_config import config_help, field_comments
from baton.config import load_config, to_yaml
from finetune.config import FinetuneConfig, LossConfig
from pretrain.config import PretrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def leaves(schema, prefix=""):
    for f in dataclasses.fields(schema):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from leaves(type(default), f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


@pytest.mark.parametrize("stage, schema", [("pretrain", PretrainConfig), ("finetune", FinetuneConfig)])
def test_help_lists_every_key_with_its_default(stage, schema, capsys):
    with pytest.raises(SystemExit) as done:
        cli([stage, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--print-config" in out
    defaults = OmegaConf.structured(schema)
    for key in leaves(schema):
        value = OmegaConf.select(defaults, key)
        assert f"  {key}=" in out, key
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert f"  {key}={value}" in out, key


def test_help_shows_the_comments_beside_the_fields():
    text = config_help(FinetuneConfig, width=400)
    assert "  loss.name=softtriple" in text and "any pytorch-metric-learning loss class" in text
    assert "  optim.loss_lr=0.01" in text and "SoftTriple centres, pml proxies" in text
    assert "  miner.kwargs={}" in text and "its constructor arguments" in text
    assert "data.batch_size=64" in text and "(> 0)" in text  # the bounded range
    # the comment lines above a field are its comment too
    assert "handoff directory (baton export) | timm:NAME" in field_comments(FinetuneConfig)["backbone"]
    assert field_comments(LossConfig)["kwargs"].startswith("the loss's constructor arguments")
    pretrain = config_help(PretrainConfig, width=400)
    assert "  train.strategy=ddp" in pretrain and "  dino.out_dim=65536" in pretrain


@pytest.mark.parametrize("stage, schema, recipe, overrides", [
    ("pretrain", PretrainConfig, "demo_clip.yaml", ["train.epochs=3", "optim.lr=0.01"]),
    ("finetune", FinetuneConfig, "demo_softtriple.yaml", ["train.epochs=3", "loss.kwargs.la=15"]),
])
def test_print_config_prints_the_resolved_config_and_does_nothing(stage, schema, recipe, overrides, tmp_path,
                                                                  capsys):
    run_dir = tmp_path / "run"
    args = [str(CONFIGS / recipe), f"run_dir={run_dir}", *overrides]
    assert cli([stage, args[0], "--print-config", *args[1:]]) == 0  # the flag anywhere among the overrides
    out = capsys.readouterr().out
    assert out == to_yaml(load_config(schema, args[0], args[1:]))
    printed = OmegaConf.create(out)
    assert printed.train.epochs == 3 and printed.run_dir == str(run_dir)
    assert not run_dir.exists() and not list(tmp_path.iterdir())


def test_print_config_still_refuses_a_bad_config(tmp_path, capsys):
    assert cli(["finetune", str(CONFIGS / "demo_softtriple.yaml"), "--print-config", "loss.kwargs.K=3"]) == 2
    assert "loss.kwargs.K" in capsys.readouterr().err
