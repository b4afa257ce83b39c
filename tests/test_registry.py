"""The one registry helper (baton/registry.py): lazy entries, one error format, and every table
of the project resolving every entry (an entry that points nowhere fails here, not in a run)."""

from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from baton.errors import BatonError
from baton.registry import Registry, UnknownName, all_registries, resolve

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("baton", "data_prep", "pretrain", "finetune", "slurm")


def test_an_entry_is_imported_only_when_used(tmp_path, monkeypatch):
    (tmp_path / "baton_lazy_probe.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry("probe", {"answer": "baton_lazy_probe:VALUE", "whole": "baton_lazy_probe"})
    assert "answer" in reg and list(reg) == ["answer", "whole"]
    assert reg.spec("answer") == "baton_lazy_probe:VALUE"
    assert "baton_lazy_probe" not in sys.modules and not reg.is_resolved("answer")
    try:
        assert reg["answer"] == 42 and reg.is_resolved("answer")
        assert reg["whole"] is sys.modules["baton_lazy_probe"]
    finally:
        sys.modules.pop("baton_lazy_probe", None)


def test_the_cli_imports_no_stage_until_one_is_chosen():
    code = ("import sys, baton.cli, slurm.task\n"
            "stages = [m for m in ('data_prep.cli', 'pretrain.train', 'finetune.train', 'slurm.submit') "
            "if m in sys.modules]\n"
            "assert not stages, stages\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT)})


def test_an_unknown_name_is_one_error_listing_the_choices():
    reg = Registry("train.strategy", {"ddp": object(), "fsdp": object(), "deepspeed": object()})
    with pytest.raises(UnknownName) as e:
        reg["foo"]
    assert str(e.value) == "unknown train.strategy 'foo': choose one of ddp, fsdp, deepspeed"
    assert isinstance(e.value, BatonError)   # the CLI prints it as one line, exit status 2
    with pytest.raises(BatonError, match=r"^unknown train.strategy 'dpp' \(did you mean 'ddp'\?\): choose one of "):
        reg.spec("dpp")
    usage = Registry("language.model", {"hf": object()}, usage="hf:NAME_OR_PATH")
    with pytest.raises(BatonError, match=r"^unknown language.model 'x': choose one of hf \(hf:NAME_OR_PATH\)$"):
        usage["x"]


def _modules_with_a_registry() -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "Registry(" in path.read_text() and path != ROOT / "baton" / "registry.py":
                parts = path.relative_to(ROOT).with_suffix("").parts
                found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


def test_every_table_resolves_every_entry():
    for module in _modules_with_a_registry():
        importlib.import_module(module)
    project = [r for r in all_registries() if r.owner.split(".")[0] in PACKAGES]
    tables = {r.what: r for r in project}
    expected = {"command", "stage", "method", "train.strategy", "backbone library", "data source",
                "data.source", "loss.name", "language.model", "language.classifier", "cluster.executor",
                "emoji design", "backbone", "glip.text_encoder", "handoff library", "language.mode"}
    assert expected <= set(tables), sorted(expected - set(tables))
    for table in project:
        for name in table:
            entry = table.spec(name)
            try:
                value = table[name]
            except Exception as e:   # noqa: BLE001 - name the entry that points nowhere
                pytest.fail(f"{table!r}: entry {name!r} -> {entry!r} does not resolve: {type(e).__name__}: {e}")
            assert value is not None or (table.what == "stage" and name == "shards"), (table, name)
            if dataclasses.is_dataclass(value) and not isinstance(value, type):   # e.g. a method's MethodSpec: "module:attr" fields
                for field in dataclasses.fields(value):
                    assert resolve(getattr(value, field.name)) is not None, (table, name, field.name)


def test_the_stage_list_is_one_list():
    from baton.stages import COMMANDS, JOB_STAGES, takes_config
    from data_prep.sources import SOURCES

    assert set(JOB_STAGES) <= set(COMMANDS)
    assert [s for s in JOB_STAGES if takes_config(s)] == ["pretrain", "finetune"]
    for name in SOURCES:   # an alias names the module that lists it
        module = SOURCES[name]
        assert name == module.NAME or name in module.ALIASES, name


def _finetune_schedule(name):
    from baton.config import load_config
    from finetune.config import FinetuneConfig
    from finetune.train import _check

    cfg = load_config(FinetuneConfig)
    cfg.optim.schedule = name
    _check(cfg, 100)


def _glip_text_encoder(name):
    from pretrain.glip.config import GlipConfig
    from pretrain.glip.model import TextEncoder

    TextEncoder(GlipConfig(text_encoder=name), 100, 0)


@pytest.mark.parametrize("key, call, choices", [
    ("train.precision", lambda n: importlib.import_module("baton.run").resolve_precision(n, "cpu"),
     "auto, fp32, bf16, fp16"),
    ("train.device", lambda n: importlib.import_module("baton.distributed").choose_device(n), "auto, cpu, cuda"),
    ("data.image_handoff", lambda n: importlib.import_module("pretrain.data.uint8_images").hands_over_uint8(n, "cpu"),
     "auto, uint8, float"),
    ("preprocess.interpolation", lambda n: importlib.import_module("finetune.model")._interp(n), "nearest, .*bicubic.*"),
    ("optim.schedule", _finetune_schedule, "cosine, constant"),
    ("glip.text_encoder", _glip_text_encoder, "open_clip, hf"),
    ("clip.caption", lambda n: importlib.import_module("pretrain.data.samples").SampleToPair(None, None, n),
     "txt, random"),
    ("split", lambda n: importlib.import_module("finetune.datasets").Split([], []).get(n), "train, test"),
    ("text pooling", lambda n: importlib.import_module("finetune.language.transformers_text").TransformersText("x", n),
     "auto, mean, pooler"),
])
def test_a_hand_checked_choice_is_the_same_error(key, call, choices):
    """Choices checked outside a Registry still raise `unknown_name`'s error, naming key and choices."""
    with pytest.raises(UnknownName, match=rf"^unknown {key} 'zzz': choose one of {choices}$"):
        call("zzz")
