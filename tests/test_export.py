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
    from pretrain.config import ModelConfig

    out = tmp_path / "backbone"
    assert cli_main(["export", str(trained_run), str(out)]) == 0  # a run dir resolves to its latest step
    meta = json.loads((out / "backbone.json").read_text())
    assert meta["library"] == "open_clip" and meta["tower"] == "visual"
    assert meta["architecture"] == "test-tiny" and meta["model_config"] == TINY_MODEL["config"]
    assert meta["embedding_dim"] == 32
    assert meta["preprocess"]["image_size"] == 32 and len(meta["preprocess"]["mean"]) == 3
    assert meta["source"]["step"] == 3 and meta["source"]["method"] == "clip"

    state, _ = load_checkpoint(trained_run)
    trained = build_clip(ModelConfig(**TINY_MODEL))
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
