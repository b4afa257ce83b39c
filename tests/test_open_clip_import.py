"""Starting from open_clip's weights the way its users name them: `backbone=open_clip:...` in
finetuning (an open_clip_train epoch_N.pt of a custom model config, a local-dir export, released
NAME@TAG) and, in pretraining, `clip.pretrained=FILE|TAG` or `clip.name=local-dir:DIR|hf-hub:ORG/NAME`
(continuing a baton CLIP export); offline, released weights fail naming the cache."""

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


def clip_method(**clip):
    from baton.distributed import DistInfo
    from pretrain.clip.config import ClipConfig
    from pretrain.config import pretrain_config
    from pretrain.method import build_method

    method = build_method(pretrain_config(clip=ClipConfig(**clip)), DistInfo())
    method.source = {"checkpoint": "none", "step": 0}
    return method


def test_pretrain_continues_from_a_baton_clip_export_by_open_clips_local_dir_name(tmp_path):
    """clip.name=local-dir:EXPORT: the run starts from the export's whole CLIP (weights, config,
    tokenizer, the export's normalisation); its own export needs the start's weights no more and
    loads in open_clip as the first did."""
    import open_clip
    from PIL import Image

    from pretrain.clip.model import build_tokenizer, preprocess_cfg
    from pretrain.clip.open_clip_weights import write_open_clip_dir

    torch.manual_seed(4)
    trained = open_clip.CLIP(**CUSTOM, output_dict=True).eval()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    pp = {"image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear"}
    start = tmp_path / "start"
    write_open_clip_dir(start, trained, CUSTOM, pp)
    method = clip_method(name=f"local-dir:{start}")
    model = method.build_model().eval()
    assert model.state_dict().keys() == trained.state_dict().keys()
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in model.state_dict().items())
    assert preprocess_cfg(model) == pp
    texts = build_tokenizer(method.cfg.clip)(["a red circle", "a blue square"])
    assert texts.shape == (2, CUSTOM["text_cfg"]["context_length"])

    with torch.no_grad():   # a step of training, then the export of the continued run
        for p in model.parameters():
            p.add_(0.01)
    (start / "open_clip_model.safetensors").unlink()   # the export builds the architecture only
    out = method.export({k: v.clone() for k, v in model.state_dict().items()}, tmp_path / "out")
    meta = json.loads((out / "backbone.json").read_text())
    assert meta["model_config"] == CUSTOM and meta["preprocess"] == pp
    again, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    image = Image.new("RGB", (40, 24), (200, 30, 90))
    x = preprocess(image).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(again.eval().encode_image(x), model.encode_image(x))
        assert torch.equal(again.encode_text(texts), model.encode_text(texts))
        assert not torch.equal(again.encode_text(texts), trained.encode_text(texts))
    # a local dir without weights would train from a random init in open_clip (a warning): refused
    with pytest.raises(BatonError, match=rf"clip.name=local-dir:{start}: .*no weights .* in {start}"):
        clip_method(name=f"local-dir:{start}").build_model()


def test_pretrain_start_spellings_that_would_drop_a_key_are_refused(tmp_path, monkeypatch):
    """Each of these would build something else than it says (open_clip ignores clip.pretrained
    beside a scheme; with clip.config the name is only a label); released weights and hub
    repositories offline name the cache to fill, as finetuning's open_clip: does."""
    from huggingface_hub import constants

    from pretrain.clip.open_clip_weights import write_open_clip_dir

    import open_clip

    write_open_clip_dir(tmp_path / "dir", open_clip.CLIP(**CUSTOM), CUSTOM,
                        {"image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear"})
    local = f"local-dir:{tmp_path / 'dir'}"
    with pytest.raises(BatonError, match=r"brings its own weights and open_clip ignores clip.pretrained"):
        clip_method(name=local, pretrained="openai").build_model()
    with pytest.raises(BatonError, match=rf"set clip.name={local} .* and unset clip.pretrained"):
        clip_method(name="ViT-B-32", pretrained=local).build_model()
    with pytest.raises(BatonError, match=r"clip.name=local-dir:.* and clip.config are both set"):
        clip_method(name=local, config=CUSTOM).build_model()
    with pytest.raises(BatonError, match=r"clip.name=local-dir:.*nowhere.*cannot read"):
        clip_method(name=f"local-dir:{tmp_path / 'nowhere'}").build_model()

    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    with pytest.raises(BatonError) as e:
        clip_method(name="hf-hub:baton-test/tiny-clip").build_model()
    assert str(e.value).startswith("clip.name=hf-hub:baton-test/tiny-clip: ")
    assert f"fill {hub / 'models--baton-test--tiny-clip'}" in str(e.value)
    with pytest.raises(BatonError) as e:
        clip_method(name="ViT-B-32", pretrained="openai").build_model()
    assert str(e.value).startswith("clip.name=ViT-B-32 clip.pretrained=openai: ") and "HF_HUB_OFFLINE" in str(e.value)
    assert str(hub / "models--timm--vit_base_patch32_clip_224.openai") in str(e.value)
    with pytest.raises(BatonError, match="no such pretrained tag for ViT-B-32"):
        clip_method(name="ViT-B-32", pretrained="no-such-tag").build_model()
