"""The handoff format (`baton.handoff`): BackboneMeta round trip, files written before it read the
same, and the text tower's sha256 check refuses a changed file by name."""

import json

import pytest
import torch

from baton.errors import BatonError
from baton.handoff import BackboneMeta, TextTower, read_handoff, read_text_tower, write_handoff, write_text_tower

PREPROCESS = {"image_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bicubic"}


def _clip_like(tmp_path):
    image = {"conv.weight": torch.randn(4, 3, 3, 3)}
    text = {"token_embedding.weight": torch.randn(10, 4), "logit_scale": torch.tensor(2.0)}
    tower = write_text_tower(tmp_path, text, tokenizer="open_clip-simple", context_length=16)
    meta = BackboneMeta(library="open_clip", architecture="tiny", model_config={"embed_dim": 4}, embedding_dim=4,
                        preprocess=PREPROCESS, source={"method": "clip", "step": 3}, text=tower,
                        extra={"open_clip": {"config": "open_clip_config.json"}})
    write_handoff(tmp_path, image, meta)
    return image, text, meta


def test_backbone_meta_round_trips_with_both_towers(tmp_path):
    image, text, meta = _clip_like(tmp_path)
    state, back = read_handoff(tmp_path)
    assert back == meta.replace(sha256=back.sha256) and back.sha256
    assert back.tower == "visual" and back.text.context_length == 16 and back.extra == meta.extra
    assert set(state) == set(image) and all(torch.equal(state[k], image[k]) for k in image)
    text_state, tower = read_text_tower(tmp_path)
    assert tower == meta.text and all(torch.equal(text_state[k], text[k]) for k in text)
    on_disk = json.loads((tmp_path / "backbone.json").read_text())
    assert on_disk == back.to_dict() and on_disk["open_clip"] == {"config": "open_clip_config.json"}
    assert dict(back) == on_disk and back["preprocess"] == PREPROCESS  # the mapping view is the file


def test_backbone_json_written_before_the_dataclass_still_reads(tmp_path):
    """A DINO export as the hand-assembled writer wrote it, and an older one without tower or source:
    both read, keep every key, and rebuild the same module."""
    import timm

    from pretrain.backbones import load_backbone
    from pretrain.models import register_timm_models

    from baton.handoff import sha256_file
    from safetensors.torch import save_file

    register_timm_models()
    net = timm.create_model("small_convnet", num_classes=0)
    for name, keep in (("dino", None), ("older", ("format", "library", "architecture", "model_config",
                                                  "embedding_dim", "preprocess", "sha256"))):
        d = tmp_path / name
        d.mkdir()
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(d / "backbone.safetensors"))
        old = {"format": "baton-backbone/1", "library": "timm", "architecture": "small_convnet",
               "model_config": {"model_name": "small_convnet", "num_classes": 0}, "tower": "model",
               "embedding_dim": int(net.num_features), "preprocess": PREPROCESS,
               "source": {"checkpoint": "x", "step": 5, "method": "dino", "weights": "teacher"},
               "sha256": sha256_file(d / "backbone.safetensors")}
        old = {k: v for k, v in old.items() if keep is None or k in keep}
        (d / "backbone.json").write_text(json.dumps(old, indent=2, sort_keys=True))
        module, meta = load_backbone(d)
        assert meta.tower == "model" and meta.text is None and meta.source == old.get("source", {})
        assert {k: v for k, v in meta.to_dict().items() if k in old} == old
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(module(x), net.eval()(x))


def test_text_tower_with_a_wrong_sha256_is_refused_naming_the_file(tmp_path):
    _clip_like(tmp_path)
    meta = json.loads((tmp_path / "backbone.json").read_text())
    meta["text"]["sha256"] = "0" * 64
    (tmp_path / "backbone.json").write_text(json.dumps(meta))
    with pytest.raises(BatonError, match=r"text_tower\.safetensors: sha256 does not match .*backbone\.json"):
        read_text_tower(tmp_path)
    read_handoff(tmp_path)  # the image tower's own check still passes


def test_a_handoff_without_a_text_tower_says_what_else_embeds_text(tmp_path):
    write_handoff(tmp_path, {"w": torch.zeros(2)}, BackboneMeta(library="timm", embedding_dim=2))
    with pytest.raises(BatonError, match="no CLIP text tower.*language.model"):
        read_text_tower(tmp_path)
    with pytest.raises(BatonError, match="`text` must be a mapping with `weights`"):
        BackboneMeta.from_dict({"library": "open_clip", "text": {"sha256": "x"}}, "b.json")
    assert TextTower.from_dict({"weights": "t.safetensors"}, "b.json").sha256 is None  # older files: unchecked


def test_towers_built_by_timm_or_hf_are_told_not_to_download():
    from baton.handoff import BackboneMeta, without_tower_downloads

    cfg = {"embed_dim": 8, "vision_cfg": {"timm_model_name": "resnet18", "timm_model_pretrained": True},
           "text_cfg": {"hf_model_name": "some/model", "hf_model_pretrained": True}}
    both = without_tower_downloads(cfg)
    assert both["vision_cfg"]["timm_model_pretrained"] is False and both["text_cfg"]["hf_model_pretrained"] is False
    assert cfg["vision_cfg"]["timm_model_pretrained"] is True           # a copy: the input is unchanged
    image_only = BackboneMeta(library="open_clip", model_config=cfg).open_clip_config()
    assert image_only["vision_cfg"]["timm_model_pretrained"] is False
    assert image_only["text_cfg"]["hf_model_pretrained"] is True       # the backbone's text tower as written
    own = {"embed_dim": 8, "vision_cfg": {"width": 16}, "text_cfg": {"width": 16}}
    assert without_tower_downloads(own) == own                           # open_clip's own towers: nothing to switch
