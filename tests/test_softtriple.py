"""SoftTriple equals a loop-by-loop transcription of the paper / official code's formula."""

from __future__ import annotations

import math

import pytest
import torch

from finetune.losses import SoftTriple, build_loss, pml_losses


def reference_softtriple(x, labels, centers_param, C, K, la, gamma, tau, margin):
    """Direct transcription, one sample / class / centre at a time."""
    D = centers_param.shape[0]
    cols = [centers_param[:, j] / centers_param[:, j].norm() for j in range(C * K)]
    total = 0.0
    for i in range(x.shape[0]):
        logits = []
        for c in range(C):
            sims = [torch.dot(x[i], cols[c * K + k]) for k in range(K)]
            exps = [torch.exp(s / gamma) for s in sims]
            z = sum(exps)
            s_c = sum(e / z * s for e, s in zip(exps, sims))
            if c == int(labels[i]):
                s_c = s_c - margin
            logits.append(la * s_c)
        logits = torch.stack(logits)
        total = total - (logits[int(labels[i])] - torch.logsumexp(logits, 0))
    loss = total / x.shape[0]
    if tau > 0 and K > 1:
        reg = 0.0
        for c in range(C):
            for a in range(K):
                for b in range(a + 1, K):
                    s = torch.dot(cols[c * K + a], cols[c * K + b])
                    reg = reg + torch.sqrt(2.0 + 1e-5 - 2.0 * s)
        loss = loss + tau * reg / (C * K * (K - 1.0))
    assert D == x.shape[1]
    return loss


@pytest.mark.parametrize("K,tau", [(3, 0.2), (4, 0.5), (2, 0.0), (1, 0.2)])
def test_matches_transcription_and_gradients(K, tau):
    torch.manual_seed(K)
    C, D, B = 5, 8, 12
    crit = SoftTriple(C, D, centers_per_class=K, la=20.0, gamma=0.1, tau=tau, margin=0.01).double()
    assert crit.centers.shape == (D, C * K)
    x = torch.nn.functional.normalize(torch.randn(B, D, dtype=torch.float64), dim=1).requires_grad_()
    labels = torch.randint(0, C, (B,))

    loss = crit(x, labels)
    gx, gc = torch.autograd.grad(loss, [x, crit.centers])

    c_ref = crit.centers.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    ref = reference_softtriple(x_ref, labels, c_ref, C, K, 20.0, 0.1, tau, 0.01)
    rx, rc = torch.autograd.grad(ref, [x_ref, c_ref])

    assert loss.item() == pytest.approx(ref.item(), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(gx, rx, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(gc, rc, rtol=1e-8, atol=1e-12)


def test_centre_layout_and_regulariser_sign():
    """Column c*K+k is centre k of class c: making class 1's centres identical zeroes its part of
    the regulariser, and putting a sample exactly on a class-1 centre makes class 1 its best class."""
    torch.manual_seed(0)
    C, K, D = 3, 4, 6
    crit = SoftTriple(C, D, centers_per_class=K, tau=1.0)
    with torch.no_grad():
        crit.centers.copy_(torch.nn.functional.normalize(crit.centers, dim=0))
        reg_before = crit.regularizer().item()
        crit.centers[:, 1 * K:2 * K] = crit.centers[:, [1 * K]]
        assert crit.regularizer().item() < reg_before
        x = crit.centers[:, 1 * K + 2].clone()[None]
        assert crit.class_similarity(x).argmax().item() == 1


def test_kaiming_init_bound_and_registry():
    crit = SoftTriple(10, 16, centers_per_class=10)
    bound = 1.0 / math.sqrt(crit.centers.shape[1])  # kaiming_uniform(a=sqrt(5)) on fan_in = C*K
    assert crit.centers.abs().max().item() <= bound + 1e-7
    assert set(pml_losses()) >= {"MarginLoss", "MultiSimilarityLoss", "TripletMarginLoss", "ProxyAnchorLoss"}
    assert isinstance(build_loss("softtriple", 10, 16, {"centers_per_class": 2}), SoftTriple)
    e = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    assert torch.isfinite(build_loss("multisimilarity", 4, 16)(e, y))
