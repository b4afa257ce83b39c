"""Starting from open_clip's weights the way its users name them: `backbone=open_clip:...` in
finetuning (an open_clip_train epoch_N.pt of a custom model config, a local-dir export, released
NAME@TAG) and `clip.pretrained=FILE` in pretraining; offline, released weights fail naming the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from baton.errors import BatonError

# A custom model config, as an open_clip_train user writes one (open_clip/model_configs/*.json format).
CUSTOM = {"embed_dim": 24,
          "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
          "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def open_clip_train_run(root: Path, model_name: str = "baton-test-custom") -> tuple[Path, Path, torch.nn.Module]:
    """(epoch_2.pt, the config json, the model) as open_clip_train leaves them: logs/NAME/params.txt
    (`model: ...` among the other arguments), logs/NAME/checkpoints/epoch_N.pt holding
    {"epoch", "name", "state_dict" (DDP's `module.` prefixes), "optimizer"}."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.CLIP(**CUSTOM).eval()
    with torch.no_grad():  # weights no fresh init has
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    config = root / f"{model_name}.json"
    config.write_text(json.dumps(CUSTOM))
    run = root / "logs" / "2025_01_01-run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "params.txt").write_text(f"batch_size: 8\nepochs: 2\nlr: 0.0005\nmodel: {model_name}\n"
                                    f"name: 2025_01_01-run\n")
    optimizer = torch.optim.AdamW(model.parameters())
    ckpt = run / "checkpoints" / "epoch_2.pt"
    torch.save({"epoch": 2, "name": "2025_01_01-run",
                "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict()}, ckpt)
    return ckpt, config, model


def test_open_clip_train_checkpoint_of_a_custom_config_is_a_backbone(tmp_path):
    from finetune.model import EmbeddingModel, load_backbone, load_embedding_model, save_embedding_model

    ckpt, config, model = open_clip_train_run(tmp_path)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.encode_image(x)
    backbone, meta = load_backbone(f"open_clip:{config}@{ckpt}")
    assert meta["library"] == "open_clip" and meta["model_config"] == CUSTOM and meta["embedding_dim"] == 24
    assert meta["preprocess"]["image_size"] == 32 and meta["source"]["checkpoint"] == str(ckpt.resolve())
    with torch.no_grad():
        assert torch.equal(backbone.eval()(x), want)
    # a finetuned model saved from it rebuilds from its metadata alone, as from an exported backbone
    embedder = EmbeddingModel(backbone, meta["embedding_dim"], 8)
    save_embedding_model(embedder, meta, tmp_path / "model")
    again, _ = load_embedding_model(tmp_path / "model")
    with torch.no_grad():
        assert torch.equal(again.eval()(x), embedder.eval()(x))

    # open_clip:FILE: the model name from open_clip_train's params.txt (a config open_clip knows)
    with pytest.raises(BatonError, match="not an open_clip model name"):
        load_backbone(f"open_clip:{ckpt}")
    import open_clip

    open_clip.add_model_config(config)  # what open_clip_train users do for a custom config
    backbone2, meta2 = load_backbone(f"open_clip:{ckpt}")
    assert meta2["architecture"] == "baton-test-custom"
    with torch.no_grad():
        assert torch.equal(backbone2.eval()(x), want)
    (tmp_path / "other.json").write_text(json.dumps({**CUSTOM, "embed_dim": 16}))
    with pytest.raises(BatonError, match="does not load into its model config"):
        load_backbone(f"open_clip:{tmp_path / 'other.json'}@{ckpt}")


def test_a_baton_export_reads_back_as_open_clip_local_dir(tmp_path):
    """open_clip:local-dir:DIR takes the open_clip layout baton export writes (or a hub repository copy)."""
    import open_clip

    from finetune.model import load_backbone
    from pretrain.clip.open_clip_weights import write_open_clip_dir

    torch.manual_seed(1)
    model = open_clip.CLIP(**CUSTOM).eval()
    pp = {"image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear"}
    write_open_clip_dir(tmp_path / "oc", model, CUSTOM, pp)
    backbone, meta = load_backbone(f"open_clip:local-dir:{tmp_path / 'oc'}")
    assert meta["preprocess"] == pp
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(backbone.eval()(x), model.encode_image(x))


def test_pretrain_starts_from_an_open_clip_train_checkpoint_of_a_custom_config(tmp_path):
    from pretrain.clip.model import build_clip
    from pretrain.clip.config import ClipConfig

    ckpt, _, model = open_clip_train_run(tmp_path)
    built = build_clip(ClipConfig(name="custom", config=CUSTOM, pretrained=str(ckpt))).eval()
    for k, v in model.state_dict().items():
        assert torch.equal(built.state_dict()[k], v), k
    with pytest.raises(BatonError, match="must be a checkpoint file"):
        build_clip(ClipConfig(name="custom", config=CUSTOM, pretrained="openai"))


def test_open_clip_checkpoints_get_the_right_hint(tmp_path):
    """Given to `baton export` or as a handoff, an open_clip_train checkpoint is pointed at
    backbone=open_clip:..., not at `baton export` (which converts baton pretrain runs only)."""
    from baton.handoff import read_handoff
    from pretrain.export import export

    ckpt, _, _ = open_clip_train_run(tmp_path)
    for path in (ckpt, ckpt.parent.parent, ckpt.parent):
        with pytest.raises(BatonError, match=r"backbone=open_clip:MODEL@.*epoch_2\.pt"):
            export(path, tmp_path / "out")
    with pytest.raises(BatonError, match=r"backbone=open_clip:MODEL@.*epoch_2\.pt") as e:
        read_handoff(ckpt)
    assert "baton export" not in str(e.value)


def test_released_open_clip_weights_offline_name_the_cache_to_fill(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from finetune.model import load_backbone

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # certainly empty
    with pytest.raises(BatonError) as e:
        load_backbone("open_clip:ViT-B-32@openai")
    msg = str(e.value)
    assert "open_clip:ViT-B-32@openai" in msg and "HF_HUB_OFFLINE" in msg
    assert str(tmp_path / "hub" / "models--timm--vit_base_patch32_clip_224.openai") in msg
    with pytest.raises(BatonError, match="no such pretrained tag"):
        load_backbone("open_clip:ViT-B-32@no-such-tag")
    with pytest.raises(BatonError, match="expected one of"):
        load_backbone("open_clip:ViT-B-32")


def test_open_clip_hf_hub_repository_offline_names_the_cache_and_loads_once_it_is_filled(tmp_path, monkeypatch):
    """backbone=open_clip:hf-hub:ORG/NAME (open_clip's own scheme). Offline with an empty cache: the
    error names the repository's directory in the HF cache; filled there (as `hf download` leaves
    it: refs/main + snapshots/REV/), the same spec loads offline, equal to the model written."""
    import shutil

    import open_clip
    from huggingface_hub import constants

    from finetune.model import load_backbone
    from pretrain.clip.open_clip_weights import write_open_clip_dir

    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    with pytest.raises(BatonError) as e:
        load_backbone("open_clip:hf-hub:baton-test/tiny-clip")
    msg = str(e.value)
    assert "open_clip:hf-hub:baton-test/tiny-clip" in msg and "HF_HUB_OFFLINE" in msg
    assert f"fill {hub / 'models--baton-test--tiny-clip'}" in msg and "HF_HOME" in msg
    with pytest.raises(BatonError, match="expected open_clip:hf-hub:ORG/NAME"):
        load_backbone("open_clip:hf-hub:no-org")

    torch.manual_seed(2)
    model = open_clip.CLIP(**CUSTOM).eval()
    pp = {"image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear"}
    write_open_clip_dir(tmp_path / "repo", model, CUSTOM, pp)
    repo = hub / "models--baton-test--tiny-clip"
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tmp_path / "repo", repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    backbone, meta = load_backbone("open_clip:hf-hub:baton-test/tiny-clip")
    assert meta["library"] == "open_clip" and meta["model_config"]["embed_dim"] == CUSTOM["embed_dim"]
    assert meta["preprocess"] == pp and meta["source"] == {"open_clip": "hf-hub:baton-test/tiny-clip"}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(backbone.eval()(x), model.encode_image(x))
