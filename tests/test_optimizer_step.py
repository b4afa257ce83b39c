"""baton.run.optimizer_step, the one clip-and-step both training loops use: the clip bounds the true
gradient norm (unscaled first under a loss scaler), and an fp16 step whose gradients overflowed is
skipped while the scale drops."""

from __future__ import annotations

import pytest
import torch

from baton.run import optimizer_step


def _model_and_grads(scaler=None):
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    loss = (lin(torch.randn(8, 4)) ** 2).sum() * 10
    (scaler.scale(loss) if scaler is not None else loss).backward()
    return lin


def test_clip_then_step_equals_the_plain_torch_calls():
    a, b = _model_and_grads(), _model_and_grads()
    oa, ob = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    optimizer_step(oa, a.parameters(), 0.5)
    torch.nn.utils.clip_grad_norm_(b.parameters(), 0.5)
    ob.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_a_scaler_unscales_before_the_clip_and_skips_an_overflow():
    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    except (RuntimeError, TypeError, AssertionError) as e:   # a torch without CPU loss scaling
        pytest.skip(f"no CPU GradScaler: {e}")
    plain, scaled = _model_and_grads(), _model_and_grads(scaler)
    op, os_ = torch.optim.SGD(plain.parameters(), lr=0.1), torch.optim.SGD(scaled.parameters(), lr=0.1)
    optimizer_step(op, plain.parameters(), 0.5)
    optimizer_step(os_, scaled.parameters(), 0.5, scaler)   # clipped on the unscaled norm: the same step
    for p, q in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    before = [p.detach().clone() for p in scaled.parameters()]
    os_.zero_grad()
    (scaler.scale(scaled(torch.randn(2, 4)).sum()) * float("inf")).backward()   # overflowing gradients
    scale = scaler.get_scale()
    optimizer_step(os_, scaled.parameters(), 0.5, scaler)
    assert scaler.get_scale() < scale                       # the overflow lowered the scale ...
    for p, q in zip(before, scaled.parameters()):
        assert torch.equal(p, q)                            # ... and the step was not applied


def test_fused_adam_where_every_parameter_allows_it():
    """Plain floating CPU parameters get torch's fused Adam kernel, and its steps equal the default
    per-tensor loop's to rounding; a group with a tensor the kernel cannot take (a meta tensor, a
    DTensor under FSDP2) leaves torch its own choice."""
    from baton.run import fused_adam_kwargs

    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    groups = [{"params": list(a.parameters()), "lr": 1e-2}]
    assert fused_adam_kwargs(groups) == {"fused": True}
    fused = torch.optim.Adam(groups, eps=1e-2, **fused_adam_kwargs(groups))
    plain = torch.optim.Adam(b.parameters(), lr=1e-2, eps=1e-2)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    x = torch.randn(8, 4)
    for _ in range(5):
        for net, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            (net(x) ** 2).sum().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert fused_adam_kwargs([{"params": [torch.nn.Parameter(torch.zeros(2, device="meta"))]}]) == {}
    assert fused_adam_kwargs([{"params": []}]) == {}
