"""timm both ways: a DINO export is a timm checkpoint timm loads itself (a weights file override or
`local-dir:`), baton's own timm models included; DINO and GLIP backbones start from timm weights
(SECTION.pretrained); released timm weights offline name the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from baton.errors import BatonError
from test_dino import TINY_VIT, tiny_method


@pytest.mark.parametrize("backbone,kwargs", [("vit_tiny_patch16_224", TINY_VIT), ("small_convnet", {})])
def test_dino_export_loads_in_timm_as_it_is(tmp_path, backbone, kwargs):
    import timm

    import pretrain.models  # noqa: F401  (registers small_convnet, as a user outside baton would)
    from pretrain.backbones import load_backbone

    method = tiny_method(backbone=backbone, backbone_kwargs=dict(kwargs))
    model = method.build_model()
    with torch.no_grad():  # a teacher unlike any fresh init
        for p in model.teacher.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = method.export({k: v.clone() for k, v in model.state_dict().items()}, tmp_path / "export")
    ours, meta = load_backbone(out)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.teacher.backbone.eval()(x)
        assert torch.equal(ours(x), want)
        by_file = timm.create_model(backbone, pretrained=True, num_classes=0, **kwargs,
                                    pretrained_cfg_overlay=dict(file=str(out / "backbone.safetensors"))).eval()
        assert torch.equal(by_file(x), want)
        by_dir = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        assert torch.equal(by_dir(x), want)
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == backbone and config["model_args"] == kwargs
    assert config["pretrained_cfg"]["mean"] == meta["preprocess"]["mean"]
    # a new classifier on the exported features: timm drops only the (absent) classifier weights
    classifier = timm.create_model(backbone, pretrained=True, num_classes=5, **kwargs,
                                   pretrained_cfg_overlay=dict(file=str(out / "backbone.safetensors"))).eval()
    with torch.no_grad():
        assert torch.equal(classifier.forward_features(x), by_file.forward_features(x))
        assert classifier(x).shape == (2, 5)


def test_small_convnet_still_has_no_released_weights():
    import timm

    import pretrain.models  # noqa: F401
    with pytest.raises(RuntimeError, match="no released weights"):
        timm.create_model("small_convnet", pretrained=True)


def test_released_timm_weights_offline_name_the_cache_to_fill(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from finetune.model import load_backbone

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # certainly empty
    with pytest.raises(BatonError) as e:
        load_backbone("timm:resnet10t")
    msg = str(e.value)
    assert "timm:resnet10t" in msg and "HF_HUB_OFFLINE" in msg
    assert str(tmp_path / "hub" / "models--timm--resnet10t.c3_in1k") in msg and "hf download timm/resnet10t" in msg
    with pytest.raises(BatonError, match="timm has no model 'no_such_net'"):
        load_backbone("timm:no_such_net")


def test_dino_starts_from_pretrained_timm_weights(tmp_path, monkeypatch):
    """dino.pretrained=FILE (or the same file as backbone_kwargs.pretrained_cfg_overlay): student and
    teacher backbones start from those weights, not a random init; the handoff's model_config stays
    the architecture. dino.pretrained=timm offline names the cache of timm's released weights."""
    from huggingface_hub import constants

    from pretrain.timm_weights import timm_cache_place

    source = tiny_method(backbone="vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT))
    model = source.build_model()
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = source.export({k: v.clone() for k, v in model.state_dict().items()}, tmp_path / "export")
    want = model.teacher.backbone.state_dict()
    weights = str(out / "backbone.safetensors")
    for over in ({"pretrained": weights},
                 {"backbone_kwargs": {**TINY_VIT, "pretrained_cfg_overlay": {"file": weights}}}):
        started = tiny_method(backbone="vit_tiny_patch16_224", **{"backbone_kwargs": dict(TINY_VIT), **over})
        fresh = started.build_model()
        for net in (fresh.student.backbone, fresh.teacher.backbone):
            got = net.state_dict()
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        again = started.export({k: v.clone() for k, v in fresh.state_dict().items()}, tmp_path / "again")
        assert json.loads((again / "backbone.json").read_text())["model_config"] == \
            {"model_name": "vit_tiny_patch16_224", "num_classes": 0, **TINY_VIT}
    with pytest.raises(BatonError, match="dino.pretrained='nowhere.safetensors': no such weights file"):
        tiny_method(pretrained="nowhere.safetensors").build_model()

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(BatonError) as e:
        tiny_method(backbone="resnet10t", backbone_kwargs={}, pretrained="timm").build_model()
    assert "dino.pretrained='timm'" in str(e.value) and timm_cache_place("resnet10t")[0] in str(e.value)


def test_glip_starts_its_image_backbone_from_timm_weights(tmp_path, monkeypatch):
    """glip.pretrained=FILE (from the command line, or as backbone_kwargs.pretrained_cfg_overlay): the
    backbone starts from those weights; the export's model_config stays the architecture and needs
    the file no more (nor does `baton ground`'s rebuild); beside glip.init_from's image tower it is
    refused; a missing file and glip.pretrained=timm offline say what to do."""
    from huggingface_hub import constants

    from baton.config import load_config
    from baton.distributed import DistInfo
    from pretrain.config import PretrainConfig
    from pretrain.glip.method import GlipMethod
    from pretrain.glip.model import build_backbone
    from pretrain.timm_weights import timm_cache_place
    from test_glip import tiny_glip
    from test_glip_init_from import small_convnet_handoff

    torch.manual_seed(5)
    source = build_backbone(tiny_glip())
    with torch.no_grad():   # BatchNorm statistics unlike a fresh init's 0 / 1
        for buf in source.buffers():
            if buf.is_floating_point():
                buf.uniform_(0.5, 1.5)
    handoff = small_convnet_handoff(tmp_path / "timm", source)
    weights = tmp_path / "start.safetensors"
    weights.write_bytes((handoff / "backbone.safetensors").read_bytes())
    want = source.state_dict()

    def method(*overrides: str) -> GlipMethod:
        cfg = load_config(PretrainConfig, Path(__file__).resolve().parents[1] / "configs" / "glip_demo.yaml",
                          ["glip.image_size=64", "glip.dim=32", "glip.text_width=32", "glip.text_layers=1",
                           "glip.fusion_layers=1", "glip.backbone=small_convnet", "glip.init_from=null", *overrides])
        return GlipMethod(cfg, DistInfo())

    torch.manual_seed(0)
    random = method().build_model().backbone.state_dict()
    assert not torch.equal(random["stages.0.bn.running_var"], want["stages.0.bn.running_var"])
    for over in ([f"glip.pretrained={weights}"], [f"glip.backbone_kwargs.pretrained_cfg_overlay.file={weights}"]):
        started = method(*over)
        got = started.build_model().backbone.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), over
    started = method(f"glip.pretrained={weights}")
    state = {k: v.clone() for k, v in started.build_model().state_dict().items()}
    weights.unlink()   # the export and a rebuild from the checkpoint do not read it again
    started.source = {"checkpoint": "none", "step": 0}
    out = started.export(state, tmp_path / "export")
    meta = json.loads((out / "backbone.json").read_text())
    assert meta["model_config"] == {"model_name": "small_convnet", "num_classes": 0}
    assert json.loads((out / "config.json").read_text())["model_args"] == {}
    started.from_checkpoint = True
    assert set(started.build_model().state_dict()) == set(state)
    with pytest.raises(BatonError, match=r"glip.pretrained='.*start.safetensors': no such weights file"):
        method(f"glip.pretrained={weights}").build_model()

    with pytest.raises(BatonError, match=r"glip.pretrained='timm' and glip.init_from=.* both choose the image "
                                         r"backbone's starting weights: keep one, or set glip.init_towers=\[text\]"):
        method("glip.pretrained=timm", f"glip.init_from={handoff}", "glip.init_towers=[image]").build_model()
    with pytest.raises(BatonError, match=r"glip.backbone_kwargs \['pretrained'\] and glip.init_from"):
        method("glip.backbone_kwargs.pretrained=true", f"glip.init_from={handoff}").build_model()
    with pytest.raises(BatonError, match="glip.pretrained='x' and glip.backbone_kwargs .* both choose"):
        method("glip.pretrained=x", "glip.backbone_kwargs.pretrained=true").build_model()
    with pytest.raises(BatonError, match="timm has no released weights for small_convnet"):
        method("glip.pretrained=timm").build_model()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(BatonError) as e:
        build_backbone(tiny_glip(backbone="resnet10t", pretrained="timm"))
    assert "glip.pretrained='timm'" in str(e.value) and timm_cache_place("resnet10t")[0] in str(e.value)
