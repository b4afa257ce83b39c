"""DINO components (pretrain/dino/) against direct transcriptions of the paper / reference code.

Random inputs throughout; a tiny timm ViT (32 px, patch 8, width 32, depth 2) keeps it fast.
"""

from __future__ import annotations

import io
import math
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from baton.distributed import DistInfo
from baton.errors import BatonError
from pretrain.data import Rejected
from pretrain.dino import schedules
from pretrain.dino.augment import MultiCrop
from pretrain.dino.config import DinoConfig
from pretrain.dino.knn import weighted_knn
from pretrain.dino.loss import dino_loss, updated_center
from pretrain.dino.method import DinoMethod
from pretrain.dino.model import DinoHead

TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, dynamic_img_size=True)


def tiny_config(**over) -> DinoConfig:
    kw = dict(backbone="vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT), out_dim=64, hidden_dim=48,
              bottleneck_dim=16, global_crop_size=32, local_crop_size=16, n_local_crops=2, drop_path_rate=0.0)
    kw.update(over)
    return DinoConfig(**kw)


def tiny_method(num_samples: int = 64, batch_size: int = 8, **over) -> DinoMethod:
    cfg = SimpleNamespace(dino=tiny_config(**over),
                          data=SimpleNamespace(num_samples=num_samples, batch_size=batch_size, train_shards=None))
    return DinoMethod(cfg, DistInfo())


def random_crops(cfg: DinoConfig, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    sizes = [cfg.global_crop_size] * 2 + [cfg.local_crop_size] * cfg.n_local_crops
    return tuple(torch.randn(batch, 3, s, s, generator=g) for s in sizes)


# ------------------------------------------------------------------ the loss (paper, Algorithm 1)

def paper_loss(student, teacher, center, n_crops, tpt, tps, m):
    """The paper's pseudo-code, multi-crop form: H(t, s) over every (global teacher view, other
    student view) pair, averaged; then C = m*C + (1-m)*cat([t1, t2]).mean(dim=0)."""
    def H(t, s):
        t = t.detach()
        s = F.softmax(s / tps, dim=1)
        t = F.softmax((t - center) / tpt, dim=1)  # center + sharpen
        return -(t * torch.log(s)).sum(dim=1).mean()

    s_views, t_views = student.chunk(n_crops), teacher.chunk(2)
    pairs = [H(t_views[q], s_views[v]) for q in range(2) for v in range(n_crops) if v != q]
    new_center = m * center + (1 - m) * torch.cat(t_views).mean(dim=0)
    return sum(pairs) / len(pairs), new_center


@pytest.mark.parametrize("n_crops", [2, 5])
def test_loss_equals_paper_pseudocode(n_crops):
    torch.manual_seed(n_crops)
    B, K = 6, 33
    student = torch.randn(n_crops * B, K, requires_grad=True)
    teacher = torch.randn(2 * B, K) * 3
    center = torch.randn(1, K) * 0.5
    # teacher temperature at epoch 2 of a 5-epoch warm-up 0.04 -> 0.07, 4 steps per epoch
    step, steps_per_epoch = 9, 4
    temp = schedules.teacher_temperature(step, steps_per_epoch, 0.04, 0.07, 5)
    assert temp == pytest.approx(np.linspace(0.04, 0.07, 5)[2], abs=1e-12)
    got = dino_loss(student, teacher, center, n_crops=n_crops, teacher_temp=temp, student_temp=0.1)
    want, want_center = paper_loss(student, teacher, center, n_crops, temp, 0.1, 0.9)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.backward()
    g_got = student.grad.clone()
    student.grad = None
    want.backward()
    torch.testing.assert_close(g_got, student.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(updated_center(center, teacher, 0.9), want_center, rtol=1e-6, atol=1e-6)


def test_method_loss_uses_model_and_updates_center():
    m = tiny_method(warmup_teacher_temp=0.04, teacher_temp=0.06, warmup_teacher_temp_epochs=3)
    model = m.build_model()
    model.center.normal_()
    crops = random_crops(m.dino, 4)
    center0 = model.center.clone()
    step = 2 * m.steps_per_epoch() + 1           # epoch 2 of the warm-up: temperature 0.06
    with torch.no_grad():
        s_out, t_out = model(*crops)
    loss, extra = m.loss(model, crops + (["k"] * 4,), step, 100)
    want, want_center = paper_loss(s_out, t_out, center0, 4, 0.06, 0.1, 0.9)
    assert extra["teacher_temp"] == pytest.approx(0.06)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.center, want_center, rtol=1e-6, atol=1e-6)
    with pytest.raises(BatonError, match="crops"):
        m.loss(model, crops[:3], step, 100)


def reference_cosine_scheduler(base, final, epochs, niter):
    """utils.cosine_scheduler of facebookresearch/dino without warm-up."""
    iters = np.arange(epochs * niter)
    return final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))


def test_schedules_equal_reference_arrays():
    epochs, steps_per_epoch = 3, 7
    total = epochs * steps_per_epoch
    mom = reference_cosine_scheduler(0.996, 1.0, epochs, steps_per_epoch)
    wd = reference_cosine_scheduler(0.04, 0.4, epochs, steps_per_epoch)
    temps = np.concatenate([np.linspace(0.04, 0.07, 2), np.ones(epochs - 2) * 0.07])
    for step in range(total):
        assert schedules.teacher_momentum(step, total, 0.996) == pytest.approx(mom[step], abs=1e-12)
        assert schedules.weight_decay(step, total, 0.04, 0.4) == pytest.approx(wd[step], abs=1e-12)
        assert schedules.teacher_temperature(step, steps_per_epoch, 0.04, 0.07, 2) == \
            pytest.approx(temps[step // steps_per_epoch])
        assert schedules.last_layer_frozen(step, steps_per_epoch, 1) == (step < steps_per_epoch)


# ------------------------------------------------------------------ model: EMA, head, multi-crop forward

def test_ema_update_exact():
    m = tiny_method()
    model = m.build_model()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    assert any(not torch.equal(s, t) for s, t in zip(model.student.parameters(), model.teacher.parameters()))
    before = [t.clone() for t in model.teacher.parameters()]
    step, total = 5, 40
    m.after_step(model, step, total)
    mom = 1 - 0.5 * (1 - 0.996) * (1 + math.cos(math.pi * step / total))
    for (name, s), t, t0 in zip(model.student.named_parameters(), model.teacher.parameters(), before):
        assert torch.equal(t, t0 * mom + (1 - mom) * s), name
    assert not any(p.requires_grad for p in model.teacher.parameters())


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_head_weight_normalised_last_layer(norm_last_layer):
    torch.manual_seed(0)
    head = DinoHead(12, 20, hidden_dim=16, bottleneck_dim=8, layers=3, norm_last_layer=norm_last_layer)
    gain = head.last_layer.parametrizations.weight.original0
    direction = head.last_layer.parametrizations.weight.original1
    assert torch.equal(gain, torch.ones(20, 1)) and gain.requires_grad == (not norm_last_layer)
    x = torch.randn(5, 12)
    z = F.normalize(head.mlp(x), dim=-1)
    torch.testing.assert_close(head(x), z @ (direction / direction.norm(dim=1, keepdim=True)).T)
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=1.0)
    head(x).pow(2).sum().backward()
    opt.step()
    rows = head.last_layer.weight.norm(dim=1)
    if norm_last_layer:   # the gain stays 1: every output is a cosine to a unit prototype
        torch.testing.assert_close(rows, torch.ones(20))
    else:
        assert not torch.allclose(rows, torch.ones(20))


def test_multicrop_forward_groups_resolutions():
    m = tiny_method()
    model = m.build_model().eval()
    crops = random_crops(m.dino, 3)
    with torch.no_grad():
        s_out, t_out = model(*crops)
        one_by_one = torch.cat([model.student.head(model.student.backbone(c)) for c in crops])
        teacher_globals = torch.cat([model.teacher.head(model.teacher.backbone(c)) for c in crops[:2]])
    assert s_out.shape == (3 * 4, 64) and t_out.shape == (3 * 2, 64)
    torch.testing.assert_close(s_out, one_by_one, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t_out, teacher_globals, rtol=1e-5, atol=1e-5)
    # the teacher starts as an exact copy of the student
    torch.testing.assert_close(t_out, s_out[:6])


def test_fixed_size_vit_with_smaller_local_crops_is_an_error():
    kwargs = {k: v for k, v in TINY_VIT.items() if k != "dynamic_img_size"}
    with pytest.raises(BatonError, match="dynamic_img_size"):
        tiny_method(backbone_kwargs=kwargs).build_model()
    with pytest.raises(BatonError, match="timm cannot build"):
        tiny_method(backbone="no_such_model_xyz").build_model()


# ------------------------------------------------------------------ optimiser groups and schedules

def test_param_groups_and_frozen_last_layer():
    m = tiny_method(num_samples=16, batch_size=8, weight_decay=0.04, weight_decay_end=0.4, freeze_last_layer=1)
    assert m.steps_per_epoch() == 2
    model = m.build_model()
    groups = m.param_groups(model)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"decay", "no_decay", "last_layer"}
    named = {id(p): n for n, p in model.named_parameters()}
    for p in by_name["no_decay"]["params"]:
        assert named[id(p)].endswith(".bias") or p.ndim == 1
    assert all(p.ndim > 1 for p in by_name["decay"]["params"])
    assert [named[id(p)] for p in by_name["last_layer"]["params"]] == [
        "student.head.last_layer.parametrizations.weight.original1"]   # the gain is frozen (norm_last_layer)
    grouped = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in grouped for p in model.teacher.parameters())
    opt = torch.optim.AdamW(groups, lr=1e-2)
    last = model.student.head.last_layer.parametrizations.weight.original1
    total = 6
    for step in range(total):
        for g in opt.param_groups:            # what the engine does: lr = optim.lr x schedule
            g["lr"] = 1e-2
        m.adjust_optimizer(opt, step, total)
        lrs = {g["name"]: g["lr"] for g in opt.param_groups}
        wds = {g["name"]: g["weight_decay"] for g in opt.param_groups}
        assert lrs["decay"] == pytest.approx(1e-2 * 8 / 256)
        assert lrs["last_layer"] == (0.0 if step < 2 else pytest.approx(1e-2 * 8 / 256))
        assert wds["decay"] == wds["last_layer"] == pytest.approx(schedules.weight_decay(step, total, 0.04, 0.4))
        assert wds["no_decay"] == 0.0
        before = last.detach().clone()
        loss, _ = m.loss(model, random_crops(m.dino, 4, seed=step), step, total)
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.after_step(model, step, total)
        assert torch.equal(last, before) == (step < 2), step


# ------------------------------------------------------------------ multi-crop augmentation

def png_sample(seed: int = 0, size: int = 40, caption: bool = True) -> dict:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    sample = {"__key__": f"k{seed}", "png": buf.getvalue()}
    if caption:
        sample["txt"] = b"a caption"
    return sample


def test_multicrop_shapes_and_per_seed_determinism():
    cfg = tiny_config(n_local_crops=3)
    aug = MultiCrop(cfg)
    sample = png_sample()
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    a = aug(sample, 7)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state
    assert [tuple(t.shape) for t in a] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(t.dtype == torch.float32 for t in a)
    b = aug(sample, 7)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = aug(sample, 8)
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert not torch.equal(a[2], a[3])                      # local crops are drawn independently
    no_caption = aug(png_sample(caption=False), 7)          # images only: no caption is fine
    assert all(torch.equal(x, y) for x, y in zip(a, no_caption))


def test_multicrop_rejects_bad_samples():
    aug = MultiCrop(tiny_config())
    with pytest.raises(Rejected) as e:
        aug({"__key__": "x", "txt": b"only text"}, 0)
    assert e.value.reason == "missing_image"
    with pytest.raises(Rejected) as e:
        aug({"__key__": "x", "png": b"not a png"}, 0)
    assert e.value.reason == "bad_image"
    with pytest.raises(BatonError, match="blur_prob"):
        MultiCrop(tiny_config(blur_prob=[1.0, 0.5]))


# ------------------------------------------------------------------ k-NN monitor

def brute_force_knn(train, train_labels, test, test_labels, k, T, num_classes):
    top1 = top5 = 0
    for x, y in zip(test.tolist(), test_labels.tolist()):
        x = np.array(x) / np.linalg.norm(x)
        sims = [(float(np.dot(x, np.array(f) / np.linalg.norm(f))), j) for j, f in enumerate(train.tolist())]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for sim, j in sims[:k]:
            votes[int(train_labels[j])] += math.exp(sim / T)
        ranking = sorted(range(num_classes), key=lambda c: (-votes[c], c))
        top1 += ranking[0] == y
        top5 += y in ranking[:min(5, k)]
    return 100 * top1 / len(test), 100 * top5 / len(test)


@pytest.mark.parametrize("k,num_classes", [(20, 7), (3, 12), (200, 4)])
def test_knn_equals_brute_force(k, num_classes):
    g = torch.Generator().manual_seed(k)
    train, test = torch.randn(90, 8, generator=g), torch.randn(37, 8, generator=g)
    train_labels = torch.randint(0, num_classes, (90,), generator=g)
    test_labels = torch.randint(0, num_classes, (37,), generator=g)
    got = weighted_knn(train, train_labels, test, test_labels, k=k, temperature=0.07,
                       num_classes=num_classes, chunk=10)
    want = brute_force_knn(train.double(), train_labels, test.double(), test_labels, min(k, 90), 0.07, num_classes)
    assert got == pytest.approx(want)


def test_knn_separable_clusters_is_perfect():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=g) * 10
    labels = torch.arange(5).repeat(20)
    feats = centres[labels] + torch.randn(100, 16, generator=g) * 0.1
    assert weighted_knn(feats[:60], labels[:60], feats[60:], labels[60:], k=20)[0] == 100.0


# ------------------------------------------------------------------ export -> finetune round trip

def test_export_teacher_backbone_round_trip(tmp_path):
    from finetune.model import load_backbone, resolve_embedder

    m = tiny_method()
    model = m.build_model()
    with torch.no_grad():       # make the teacher differ from the student
        for p in model.student.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    m.after_step(model, 0, 10)
    out = m.export({k: v.clone() for k, v in model.state_dict().items()}, tmp_path / "export")
    backbone, meta = load_backbone(out)
    assert meta["library"] == "timm" and meta["tower"] == "model" and meta["source"]["method"] == "dino"
    assert meta["embedding_dim"] == 32 and meta["preprocess"]["image_size"] == 32
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = model.teacher.backbone.eval()(x)
        torch.testing.assert_close(backbone(x), want)
        assert not torch.allclose(model.student.backbone.eval()(x), want)
    embedder = resolve_embedder(str(out))       # what `baton evaluate HANDOFF` builds
    with torch.no_grad():
        torch.testing.assert_close(embedder.model(x), F.normalize(want, dim=1))
    with pytest.raises(BatonError, match="not a DINO run"):
        m.export({"visual.proj": torch.zeros(2)}, tmp_path / "bad")


# ------------------------------------------------------------------ shipped configs

@pytest.mark.parametrize("name", ["dino_demo.yaml", "dino_vit_s16.yaml"])
def test_config_dino_sections_load(tmp_path, name):
    from omegaconf import OmegaConf

    from baton.config import load_config

    root = Path(__file__).resolve().parents[1]
    section = OmegaConf.load(root / "configs" / name)["dino"]
    (tmp_path / "dino.yaml").write_text(OmegaConf.to_yaml(section))
    cfg = load_config(DinoConfig, tmp_path / "dino.yaml")
    assert cfg.global_crop_size > cfg.local_crop_size
    if name == "dino_demo.yaml":   # the demo's model and crops build and run on a 64 px image
        method = DinoMethod(SimpleNamespace(dino=cfg, data=SimpleNamespace(
            num_samples=128, batch_size=64, train_shards=None, image_handoff="uint8")), DistInfo())
        crops = method.sample_map(None)(png_sample(size=64), 0)
        assert [t.shape[-1] for t in crops] == [64, 64] + [32] * cfg.n_local_crops
        model = method.build_model()
        with torch.no_grad():
            s_out, t_out = model(*method.on_device(tuple(c[None] for c in crops)))
        assert s_out.shape == (2 + cfg.n_local_crops, cfg.out_dim) and t_out.shape == (2, cfg.out_dim)
