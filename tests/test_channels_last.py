"""`train.channels_last` (pretrain and finetune): the convnet's 4-D weights and the image batches
are channels-last while it trains, the numbers follow the default layout to float rounding, and the
checkpoint, export and saved model are ordinary contiguous tensors that load anywhere."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from baton.cli import main as cli_main
from baton.logs import read_metrics
from baton.run import to_channels_last
from pretrain.models import register_timm_models
from test_finetune_precision import finetune, losses, setup  # noqa: F401  (the fixture)

pytest.importorskip("open_clip")
register_timm_models()

CONVNET_CLIP = {"name": "test-convnet", "config": {
    "embed_dim": 16, "vision_cfg": {"image_size": 32, "timm_model_name": "small_convnet", "timm_pool": "flatten",
                                    "timm_proj": "linear"},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}}


def test_to_channels_last_changes_the_layout_not_the_values():
    x = torch.rand(2, 3, 8, 8)
    y = to_channels_last(x)
    assert y.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x, y)
    ids = torch.arange(6).view(1, 1, 2, 3)        # integer and non-4-D tensors pass through untouched
    image = x[0]
    assert to_channels_last(ids) is ids and to_channels_last(image) is image
    conv = to_channels_last(torch.nn.Conv2d(3, 4, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def _layouts_seen():
    seen: set[bool] = set()

    def record(module, args, out):
        if isinstance(module, torch.nn.Conv2d) and torch.is_grad_enabled():
            seen.add(args[0].is_contiguous(memory_format=torch.channels_last)
                     and module.weight.is_contiguous(memory_format=torch.channels_last))
    return seen, torch.nn.modules.module.register_module_forward_hook(record)


def test_pretrain_channels_last_follows_the_default_layout(tmp_path, synthetic_shards):
    runs = {}
    for name, flag in (("plain", False), ("nhwc", True)):
        cfg = {"run_dir": str(tmp_path / name), "seed": 0, "clip": CONVNET_CLIP,
               "data": {"train_shards": str(synthetic_shards), "batch_size": 8, "workers": 0, "shuffle_buffer": 32},
               "optim": {"lr": 1e-3, "warmup_steps": 2},
               "train": {"epochs": 1, "max_steps": 4, "checkpoint_every": 100, "log_every": 1, "device": "cpu",
                         "channels_last": flag}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        seen, handle = _layouts_seen()
        try:
            assert cli_main(["pretrain", str(tmp_path / f"{name}.yaml")]) == 0
        finally:
            handle.remove()
        assert seen == {flag}, (name, seen)        # every training conv ran in the layout asked for
        assert cli_main(["export", str(tmp_path / name), str(tmp_path / name / "export")]) == 0
        runs[name] = tmp_path / name
    a = [r["loss"] for r in read_metrics(runs["plain"] / "metrics.jsonl")]
    b = [r["loss"] for r in read_metrics(runs["nhwc"] / "metrics.jsonl")]
    # the first loss is one forward of the same weights: equal to float rounding; Adam's normalised
    # steps then amplify rounding-level gradient differences a little
    assert len(a) == len(b) == 4 and b[0] == pytest.approx(a[0], rel=1e-4) and b == pytest.approx(a, rel=3e-2)
    from safetensors.torch import load_file
    wa = load_file(str(runs["plain"] / "export" / "backbone.safetensors"))
    wb = load_file(str(runs["nhwc"] / "export" / "backbone.safetensors"))   # safetensors: contiguous only
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-2, msg=k)


def test_finetune_channels_last_follows_the_default_layout(setup):  # noqa: F811
    from safetensors.torch import load_file

    root, handoff = setup
    plain = finetune(root, handoff, "layout_plain", "train.precision=fp32")
    seen, handle = _layouts_seen()
    try:
        nhwc = finetune(root, handoff, "layout_nhwc", "train.precision=fp32", "train.channels_last=true")
    finally:
        handle.remove()
    assert seen == {True}
    assert losses(nhwc) == pytest.approx(losses(plain), rel=1e-4)
    wa = load_file(str(plain / "model" / "model.safetensors"))
    wb = load_file(str(nhwc / "model" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_channels_last_refused_by_strategies_that_shard_flat_parameters(tmp_path, synthetic_shards, capsys, strategy):
    cfg = {"run_dir": str(tmp_path / "run"), "seed": 0, "clip": CONVNET_CLIP,
           "data": {"train_shards": str(synthetic_shards), "batch_size": 8, "workers": 0},
           "train": {"max_steps": 1, "device": "cpu", "channels_last": True, "strategy": strategy}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert cli_main(["pretrain", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"train.strategy={strategy}" in err and "train.channels_last=false" in err
    assert not (tmp_path / "run" / "checkpoints").exists()
