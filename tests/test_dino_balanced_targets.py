"""DINOv2's anti-collapse pieces in the DINO method: Sinkhorn-Knopp teacher targets
(`dino.centering=sinkhorn_knopp`) and the KoLeo regulariser (`dino.koleo_loss_weight`), each against
a plain float64 transcription, and through the method (the keys take effect). 2 ranks:
tests/test_dino_engine.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from baton.errors import BatonError
from pretrain.dino.koleo import koleo_loss
from pretrain.dino.loss import distillation_loss, dino_loss, sinkhorn_knopp_targets
from test_dino import random_crops, tiny_method


def sinkhorn_reference(teacher: np.ndarray, temp: float, iterations: int) -> np.ndarray:
    """dinov2's SinkhornKnopp on one process, written out in float64: Q = exp(t / temp)^T (K x B),
    Q /= sum(Q); then `iterations` times: each prototype's row to 1/K, each sample's column to 1/B;
    finally columns times B, returned as B x K."""
    q = np.exp(teacher.astype(np.float64) / temp).T
    k, b = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(axis=1, keepdims=True) / k
        q = q / q.sum(axis=0, keepdims=True) / b
    return (q * b).T


@pytest.mark.parametrize("iterations", [1, 3])
def test_sinkhorn_knopp_equals_reference(iterations):
    rng = np.random.default_rng(iterations)
    teacher = rng.normal(size=(12, 40)) * 0.8
    got = sinkhorn_knopp_targets(torch.from_numpy(teacher).float(), 0.07, iterations)
    want = sinkhorn_reference(teacher, 0.07, iterations)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got.sum(dim=1).numpy(), 1.0, rtol=1e-5)      # a distribution per sample


def test_sinkhorn_knopp_balances_where_the_centred_softmax_does_not():
    """A teacher whose every output prefers prototype 0: the centred softmax (centre 0) gives every
    sample the same target, Sinkhorn-Knopp spreads the batch over the prototypes."""
    teacher = torch.randn(32, 8) * 0.1
    teacher[:, 0] += 1.0
    plain = torch.softmax(teacher / 0.07, dim=-1)
    balanced = sinkhorn_knopp_targets(teacher, 0.07, iterations=10)
    assert plain[:, 0].mean() > 0.9
    np.testing.assert_allclose(balanced.sum(dim=0).numpy(), 32 / 8, rtol=0.05)  # every prototype ~B/K


def test_distillation_loss_with_centred_targets_equals_dino_loss():
    torch.manual_seed(0)
    student, teacher, center = torch.randn(4 * 5, 16), torch.randn(2 * 5, 16), torch.randn(1, 16)
    targets = torch.softmax((teacher - center) / 0.04, dim=-1)
    torch.testing.assert_close(distillation_loss(student, targets, n_crops=4, student_temp=0.1),
                               dino_loss(student, teacher, center, n_crops=4, teacher_temp=0.04, student_temp=0.1))


def test_koleo_equals_brute_force_nearest_neighbour():
    torch.manual_seed(1)
    x = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    got = koleo_loss(x)
    xn = torch.nn.functional.normalize(x, dim=-1)
    d = torch.cdist(xn, xn) + torch.diag(torch.full((10,), float("inf"), dtype=torch.float64))
    want = -torch.log(d.min(dim=1).values).mean()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    got.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="at least 2"):
        koleo_loss(torch.randn(1, 6))


def test_method_uses_sinkhorn_targets_and_koleo():
    """The keys take effect: with sinkhorn_knopp the centre is not used (nor updated) and the loss is
    the distillation loss on the balanced targets; koleo adds weight x KoLeo of each global crop."""
    m = tiny_method(centering="sinkhorn_knopp", koleo_loss_weight=0.5, teacher_temp=0.07)
    model = m.build_model()
    model.center.normal_()
    center0 = model.center.clone()
    crops = random_crops(m.dino, 4)
    step = 3 * m.steps_per_epoch()
    loss, extra = m.loss(model, crops, step, 100)
    torch.testing.assert_close(model.center, center0)
    with torch.no_grad():
        s_out, t_out, feats = model(*crops, return_features=True)
        want_dino = distillation_loss(s_out, sinkhorn_knopp_targets(t_out, 0.07, 3), n_crops=4, student_temp=0.1)
        want_koleo = koleo_loss(feats[:4]) + koleo_loss(feats[4:8])
    assert feats.shape[0] == 8
    assert float(extra["dino_loss"]) == pytest.approx(float(want_dino), rel=1e-5)
    assert float(extra["koleo_loss"]) == pytest.approx(float(want_koleo), rel=1e-5)
    assert float(loss.detach()) == pytest.approx(float(want_dino + 0.5 * want_koleo), rel=1e-5)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.backbone.parameters())


def test_unknown_centering_is_refused():
    with pytest.raises(BatonError, match="dino.centering.*sinkhorn_knopp"):
        tiny_method(centering="sinkhorn")


def test_null_backbone_kwarg_is_refused_not_dropped():
    """`{grid:1}` in YAML flow style is the key 'grid:1' with a null value, which timm.create_model
    drops without a word: refused, naming the key."""
    with pytest.raises(BatonError, match=r"backbone_kwargs.grid:1 is null"):
        tiny_method(backbone="small_convnet", backbone_kwargs={"grid:1": None}).build_model()
