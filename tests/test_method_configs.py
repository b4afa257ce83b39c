"""Each pretraining method owns its config section (`method: NAME` + `NAME: {...}`), and configs of
the layout before (a top-level CLIP `model:` section, a `dino:` section in every config) still load,
resume and export, with a warning naming the new key."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from baton.config import from_yaml, load_config, read_recipe, to_yaml
from baton.errors import BatonError
from finetune.config import FinetuneConfig
from pretrain.config import PretrainConfig
from pretrain.dino.config import DinoConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def old_layout(cfg) -> str:
    """`cfg` as the config.yaml a run wrote before methods owned their sections: the CLIP section
    under `model:` with its eval, caption and augment keys in the engine's `eval:` and `data:`, and
    a `dino:` section of defaults in every config."""
    node = OmegaConf.to_container(OmegaConf.create(to_yaml(cfg)))
    if "clip" in node:
        node["model"] = node.pop("clip")
        node["eval"] = node["model"].pop("eval")
        node["data"]["caption"], node["data"]["augment"] = node["model"].pop("caption"), node["model"].pop("augment")
    else:
        node["model"] = {"name": "ViT-B-16", "config": None, "pretrained": None}
    node.setdefault("dino", OmegaConf.to_container(OmegaConf.structured(DinoConfig)))
    return OmegaConf.to_yaml(node)


def test_old_and_new_clip_layouts_load_to_equal_configs(tmp_path, caplog):
    new = load_config(PretrainConfig, CONFIGS / "demo_clip.yaml")
    old_file = tmp_path / "old.yaml"
    old_file.write_text(old_layout(new))
    with caplog.at_level(logging.WARNING, logger="baton"):
        old = load_config(PretrainConfig, old_file)
    assert old == new and type(old) is type(new)
    assert "config key 'model' is now spelled 'clip'" in caplog.text
    assert "'dino' is not read any more" in caplog.text
    for old, new in (("eval", "clip.eval"), ("data.caption", "clip.caption"), ("data.augment", "clip.augment")):
        assert f"config key '{old}' is now spelled '{new}'" in caplog.text
    # an old override spelling moves with its section
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="baton"):
        cfg = load_config(PretrainConfig, CONFIGS / "demo_clip.yaml", ["model.pretrained=some.pt"])
    assert cfg.clip.pretrained == "some.pt" and "now spelled 'clip'" in caplog.text
    with pytest.raises(BatonError, match="sets both 'model' and 'clip'"):
        (tmp_path / "both.yaml").write_text("model: {name: a}\nclip: {name: b}\n")
        load_config(PretrainConfig, tmp_path / "both.yaml")


def test_the_method_section_is_the_methods_own_dataclass():
    clip, dino = load_config(PretrainConfig), load_config(PretrainConfig, None, ["method=dino"])
    assert clip.method_section is clip.clip and not hasattr(clip, "dino")
    assert isinstance(dino.method_section, DinoConfig) and not hasattr(dino, "clip")
    assert from_yaml(PretrainConfig, to_yaml(dino)) == dino
    with pytest.raises(BatonError, match=r"unknown method 'simclr'.*: choose one of clip, dino, glip$"):
        load_config(PretrainConfig, None, ["method=simclr"])


@pytest.mark.parametrize("where", ["file", "override"])
def test_a_wrong_key_or_value_in_a_methods_section_is_refused_naming_it(tmp_path, where):
    recipe = tmp_path / "dino.yaml"
    recipe.write_text("method: dino\ndino:\n  out_dimm: 8\n" if where == "file" else "method: dino\n")
    overrides = ["dino.out_dimm=8"] if where == "override" else []
    with pytest.raises(BatonError, match=r"unknown config key 'dino.out_dimm'. Did you mean 'out_dim'"):
        load_config(PretrainConfig, recipe, overrides)
    with pytest.raises(BatonError, match=r"config key dino.teacher_temp=0.0 is out of range"):
        load_config(PretrainConfig, recipe if where == "override" else None, ["method=dino", "dino.teacher_temp=0"])
    with pytest.raises(BatonError, match="bad value for config key 'clip.lock_text_cache'"):
        load_config(PretrainConfig, None, ["clip.lock_text_cache=many"])
    with pytest.raises(BatonError, match="unknown config key 'clip'"):  # a section another method reads
        load_config(PretrainConfig, None, ["method=dino", "clip.name=x"])


def stage_schema(recipe: Path):
    node = read_recipe(recipe)
    return FinetuneConfig if "backbone" in node or "loss" in node else PretrainConfig


@pytest.mark.parametrize("recipe", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_loads_with_its_stages_loader_without_old_spellings(recipe, caplog):
    with caplog.at_level(logging.WARNING, logger="baton"):
        cfg = load_config(stage_schema(recipe), recipe)
    assert not caplog.records, caplog.text  # the in-repo recipes use the current spelling
    if isinstance(cfg, PretrainConfig):
        assert dataclass_fields_of(cfg) >= {cfg.method}


def dataclass_fields_of(cfg) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(cfg)}


@pytest.mark.slow
def test_a_checkpoint_of_the_old_layout_resumes_and_exports(tmp_path, synthetic_shards, caplog):
    """A run whose config.yaml and checkpoint hold the old layout continues with resume=latest (no
    changed-config warning: nothing changed but the spelling) and exports."""
    from baton.checkpoint import latest_checkpoint, load_checkpoint
    from pretrain.export import export
    from pretrain.train import train
    from test_pretrain import write_tiny_config

    run = tmp_path / "run"
    recipe = write_tiny_config(tmp_path / "c.yaml", run, synthetic_shards, train={"max_steps": 4, "checkpoint_every": 2})
    assert train(load_config(PretrainConfig, recipe, ["train.stop_after_steps=2"])) == 0
    step_dir = latest_checkpoint(run / "checkpoints")
    state = torch.load(step_dir / "state.pt", weights_only=True)
    state["config"] = old_layout(from_yaml(PretrainConfig, state["config"]))
    assert "\nmodel:" in state["config"] and "\nclip:" not in state["config"]
    torch.save(state, step_dir / "state.pt")
    (run / "config.yaml").write_text(state["config"])

    old_recipe = tmp_path / "old.yaml"
    old_recipe.write_text(state["config"])
    with caplog.at_level(logging.WARNING, logger="baton"):
        assert train(load_config(PretrainConfig, old_recipe, ["resume=latest", "train.stop_after_steps=null"])) == 0
    assert "resuming with a changed config" not in caplog.text
    assert load_checkpoint(run)[0]["step"] == 4
    out = export(step_dir, tmp_path / "export")  # the old-layout checkpoint itself
    assert (out / "backbone.safetensors").is_file()


def test_finetune_reads_its_old_key_names_as_the_pretrain_names_with_a_warning(tmp_path, caplog):
    """One name per meaning in every stage: finetuning's old spellings map, each warning naming the new key."""
    from baton.run import config_changes

    old = tmp_path / "old.yaml"
    old.write_text("resume: ''\noptim: {warmup: 7, grad_clip: 0}\ntrain: {keep_checkpoints: 4}\n")
    with caplog.at_level(logging.WARNING, logger="baton"):
        cfg = load_config(FinetuneConfig, old)
    assert (cfg.optim.warmup_steps, cfg.optim.grad_clip, cfg.train.keep_last, cfg.resume) == (7, None, 4, None)
    for new in ("'optim.warmup_steps'", "'train.keep_last'", "optim.grad_clip=null", "resume=null"):
        assert new in caplog.text, new
    assert cfg == load_config(FinetuneConfig, None, ["optim.warmup_steps=7", "train.keep_last=4"])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="baton"):
        by_override = load_config(FinetuneConfig, None, ["optim.warmup=7", "optim.grad_clip=0",
                                                         "train.keep_checkpoints=4", "resume="])
    assert by_override == cfg and "'optim.warmup_steps'" in caplog.text and "optim.grad_clip=null" in caplog.text
    with pytest.raises(BatonError, match="optim.grad_clip=-1.0 is out of range"):
        load_config(FinetuneConfig, None, ["optim.grad_clip=-1"])
    # a run saved with the old names resumes without a changed-config warning
    saved = old.read_text().replace("warmup: 7", "warmup: 7, lr: 0.0001")
    assert config_changes(saved, cfg) == []


def test_method_section_reads_the_dataclass_a_mapping_or_nothing():
    """DINO's and GLIP's methods read their section through one helper (pretrain.method.method_section)."""
    from types import SimpleNamespace

    from baton.errors import BatonError
    from pretrain.dino.config import DinoConfig
    from pretrain.glip.config import GlipConfig
    from pretrain.method import method_section

    own = DinoConfig(out_dim=32)
    assert method_section(SimpleNamespace(dino=own), "dino", DinoConfig) is own
    assert method_section(SimpleNamespace(dino={"out_dim": 16}), "dino", DinoConfig) == DinoConfig(out_dim=16)
    assert method_section(SimpleNamespace(), "glip", GlipConfig) == GlipConfig()
    with pytest.raises(BatonError, match="config key 'glip': .*valid keys: .*backbone"):
        method_section(SimpleNamespace(glip={"no_such_key": 1}), "glip", GlipConfig)


def test_keys_the_engine_held_for_one_method_are_that_methods_own(tmp_path, caplog):
    """eval:, data.caption and data.augment were engine keys; now clip.eval, clip.caption,
    clip.augment, glip.eval and dino.knn_max_skipped_fraction. Old recipes and overrides are read as
    those with a warning naming the new key; what the chosen method never read is left out with a
    warning; both spellings at once are refused."""
    old = tmp_path / "old.yaml"
    old.write_text("method: glip\ndata: {caption: random, augment: {scale: [0.5, 1.0]}}\n"
                   "eval: {shards: held/out, max_samples: 7, batch_size: 3, max_skipped_fraction: 0.2, templates: openai}\n")
    with caplog.at_level(logging.WARNING, logger="baton"):
        glip = load_config(PretrainConfig, old)
    assert (glip.glip.eval.shards, glip.glip.eval.max_samples, glip.glip.eval.batch_size,
            glip.glip.eval.max_skipped_fraction) == ("held/out", 7, 3, 0.2)
    assert not hasattr(glip, "eval") and not hasattr(glip.data, "caption") and not hasattr(glip.data, "augment")
    for key in ("shards", "max_samples", "batch_size", "max_skipped_fraction"):
        assert f"config key 'eval.{key}' is now spelled 'glip.eval.{key}'" in caplog.text
    for key in ("eval", "data.caption", "data.augment"):   # CLIP's keys: GLIP never read them
        assert f"config key '{key}' is not read any more and was left out: method=glip does not read it" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="baton"):
        dino = load_config(PretrainConfig, CONFIGS / "dino_demo.yaml", ["eval.max_skipped_fraction=0.3",
                                                                          "eval.shards=x", "data.caption=random"])
    assert dino.dino.knn_max_skipped_fraction == 0.3
    assert "'eval.max_skipped_fraction' is now spelled 'dino.knn_max_skipped_fraction'" in caplog.text
    assert "override 'eval.shards=x': config key 'eval' is not read any more" in caplog.text
    assert "override 'data.caption=random': config key 'data.caption' is not read any more" in caplog.text

    clip = load_config(PretrainConfig, CONFIGS / "demo_clip.yaml", ["eval.templates=openai", "data.caption=txt",
                                                                      "data.augment.gray_scale_prob=0.5"])
    assert (clip.clip.eval.templates, clip.clip.caption, clip.clip.augment.gray_scale_prob) == ("openai", "txt", 0.5)
    (tmp_path / "both.yaml").write_text("data: {caption: txt}\nclip: {caption: random}\n")
    with pytest.raises(BatonError, match="sets both 'data.caption' and 'clip.caption'"):
        load_config(PretrainConfig, tmp_path / "both.yaml")


def test_dino_knn_monitor_reads_its_own_skipped_fraction(monkeypatch):
    """dino.knn_max_skipped_fraction is the limit the k-NN monitor of a DINO run checks."""
    from types import SimpleNamespace

    from baton.distributed import DistInfo
    from pretrain.dino.method import DinoMethod
    from pretrain.dino.monitor import KnnMonitor
    from test_dino import tiny_config

    seen = []
    monkeypatch.setattr(KnnMonitor, "__call__", lambda self, backbone, device: seen.append(self.max_skipped_fraction) or {})
    cfg = SimpleNamespace(dino=tiny_config(knn_shards="held/out", knn_max_skipped_fraction=0.25),
                          data=SimpleNamespace(num_samples=64, batch_size=8, train_shards=None))
    method = DinoMethod(cfg, DistInfo())
    assert method.evaluate(method.build_model(), 0) == {} and seen == [0.25]
