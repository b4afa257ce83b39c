"""GLIP under the engine's precision and strategies: bf16 autocast on CPU (`train.precision=bf16`, the
DDP strategy's `torch.autocast`) gives the fp32 loss and gradients to bf16 accuracy, with the
parameters kept in fp32; FSDP2 in a world of one (the FSDP strategy: GLIP's shard units, its scalar
parameters replicated) trains exactly like the plain module, optimiser state included; DeepSpeed
ZeRO-2 on CPU (gloo, a world of one) follows DDP, checkpoints and resumes exactly (its 2-rank CPU
path is covered under torchrun in tests/test_strategies.py, with CLIP)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from test_glip_engine import make_grounding_shards, mapped_batch
from test_glip import tiny_glip


@pytest.fixture(scope="module")
def batches(tmp_path_factory) -> list[tuple]:
    shards = make_grounding_shards(tmp_path_factory.mktemp("grounding"), n=16)
    batch = mapped_batch(shards, 16)
    return [tuple(t[:8] for t in batch), tuple(t[8:] for t in batch)]


def method_and_strategy(strategy: str, precision: str = "fp32", **glip):
    from baton.config import load_config
    from baton.distributed import DistInfo
    from pretrain.config import PretrainConfig
    from pretrain.glip.method import GlipMethod
    from pretrain.strategies import strategy_class

    cfg = load_config(PretrainConfig, None, ["method=glip", f"train.strategy={strategy}",
                                             f"train.precision={precision}", "optim.lr=3e-3", "optim.grad_clip=1.0"])
    cfg.glip = tiny_glip(**glip)
    info = DistInfo()
    method = GlipMethod(cfg, info)
    torch.manual_seed(0)
    model = method.build_model()
    s = strategy_class(strategy)(cfg, info, method)
    net, _ = s.setup(model, method.param_groups)
    return method, s, net


def train_steps(method, s, net, batches: list[tuple]) -> list[float]:
    """The engine's step: forward + loss under the strategy's autocast, its backward and step."""
    losses = []
    for i, batch in enumerate(batches):
        with s.autocast():
            loss, _ = method.loss(net, batch, i, len(batches))
        s.backward(loss, 1, True)
        s.step(method.cfg.optim.grad_clip)
        s.after_step(i, len(batches))
        losses.append(float(loss.detach()))
    return losses


def test_lock_text_trains_everything_but_the_text_encoder(batches):
    """glip.lock_text: the text encoder keeps its starting weights and stays in eval mode while every
    other part learns, and the optimiser is not given its weights."""
    method, s, net = method_and_strategy("ddp", lock_text=True)
    text_before = {k: v.clone() for k, v in net.text.state_dict().items()}
    rest_before = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("text.")}
    net.train()
    assert not net.text.training and net.fusion.training
    train_steps(method, s, net, batches)
    assert all(torch.equal(v, text_before[k]) for k, v in net.text.state_dict().items())
    moved = {k for k, v in net.state_dict().items() if not k.startswith("text.") and not torch.equal(v, rest_before[k])}
    assert {"text_in.weight", "bias0"} <= moved
    assert any(k.startswith("backbone.") for k in moved) and any(k.startswith("fusion.") for k in moved)
    in_optimizer = {id(p) for g in method.param_groups(net) for p in g["params"]}
    assert not any(id(p) in in_optimizer for p in net.text.parameters())
    unlocked = method_and_strategy("ddp")[2]
    unlocked.train()
    assert unlocked.text.training and all(p.requires_grad for p in unlocked.text.parameters())


def test_bf16_autocast_on_cpu_matches_fp32_to_bf16_accuracy(batches):
    grads = {}
    losses = {}
    for precision in ("fp32", "bf16"):
        method, s, net = method_and_strategy("ddp", precision)
        batch = batches[0]
        with s.autocast():
            out = net(*batch[:3])
            loss, parts = method.loss(net, batch, 0, 1)
        assert out["logits"].dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
        loss.backward()
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in net.parameters())
        losses[precision] = (float(loss.detach()), parts)
        grads[precision] = torch.cat([p.grad.flatten() for p in net.parameters()])
    (l32, p32), (l16, p16) = losses["fp32"], losses["bf16"]
    assert l16 != l32 and abs(l16 - l32) < 0.03 * l32, (l32, l16)
    assert p16["positives"] == p32["positives"] > 0
    for part in ("align_loss", "box_loss", "centerness_loss"):
        assert abs(p16[part] - p32[part]) < 0.05 * p32[part] + 1e-3, (part, p32, p16)
    cosine = torch.nn.functional.cosine_similarity(grads["fp32"], grads["bf16"], dim=0)
    assert cosine > 0.99, float(cosine)


def test_bf16_training_steps_follow_fp32(batches):
    """Two AdamW steps per precision: the losses agree to bf16 accuracy (the second one after a step)."""
    fp32 = train_steps(*method_and_strategy("ddp", "fp32"), batches)
    bf16 = train_steps(*method_and_strategy("ddp", "bf16"), batches)
    assert all(abs(a - b) < 0.05 * a for a, b in zip(fp32, bf16)), (fp32, bf16)


def test_fsdp2_world_of_one_equals_the_plain_module(batches):
    import torch.distributed as dist

    from pretrain.strategies.base import full_state

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    plain = method_and_strategy("ddp")
    plain_losses = train_steps(*plain, batches)
    plain_model, plain_optim = full_state(plain[1].model, plain[1].optimizer)
    try:
        method, s, net = method_and_strategy("fsdp")      # initialises a world of one (HashStore)
        from torch.distributed.tensor import DTensor
        assert any(isinstance(p, DTensor) for p in net.parameters())
        sharded_losses = train_steps(method, s, net, batches)
        model, optim = full_state(s.model, s.optimizer)
    finally:
        dist.destroy_process_group()
    assert sharded_losses == pytest.approx(plain_losses, rel=1e-6)
    assert set(model) == set(plain_model)
    # AdamW's first steps move every weight by ~lr (3e-3) whatever the gradient's size, so a gradient
    # that is summation noise (a bias whose gradient is ~0) differs by up to ~1e-5: the tolerance
    for k, v in plain_model.items():
        torch.testing.assert_close(model[k], v, rtol=1e-4, atol=2e-5, msg=lambda m: f"{k}: {m}")
    assert set(optim["state"]) == set(plain_optim["state"])
    for k, v in plain_optim["state"].items():
        torch.testing.assert_close(optim["state"][k]["exp_avg"], v["exp_avg"], rtol=1e-4, atol=1e-7,
                                   msg=lambda m: f"{k}: {m}")


@pytest.mark.slow   # importing deepspeed takes seconds
@pytest.mark.parametrize("glip", [{}, {"backbone_lr_factor": 0.1}], ids=["plain", "backbone_lr_factor"])
def test_deepspeed_zero2_trains_like_ddp_checkpoints_and_resumes_exactly(tmp_path, glip):
    """ZeRO-2 on CPU (gloo, a world of one in this process): 12 steps follow DDP's losses (also with the
    backbone's own optimiser groups of glip.backbone_lr_factor, their lr kept by ZeRO); cut after 5
    and resumed from DeepSpeed's own checkpoint files, the weights equal the uninterrupted run's
    bit for bit (AdamW's moments came back too: without them the later steps would differ); the run
    exports and `baton evaluate` scores it. Four runs in one process: each one's teardown releases
    DeepSpeed's cached groups (`baton.compat.destroy_process_group`), or the second would fail."""
    import json

    import torch.distributed as dist

    from baton.checkpoint import load_checkpoint
    from baton.cli import main as cli_main
    from pretrain.strategies import full_model_state
    from test_glip_engine import make_grounding_shards, metrics, run_engine

    shards = make_grounding_shards(tmp_path / "scenes", n=32)
    ds = ("train.strategy=deepspeed", "train.zero_stage=2", "train.epochs=3", "train.log_every=1")
    assert run_engine(shards, tmp_path / "ddp", *ds[2:], "train.strategy=ddp", **glip) == 0
    assert run_engine(shards, tmp_path / "full", *ds, "train.checkpoint_every=100", **glip) == 0
    assert run_engine(shards, tmp_path / "cut", *ds, "train.stop_after_steps=5", "train.checkpoint_every=5", **glip) == 0
    assert not dist.is_initialized()
    assert run_engine(shards, tmp_path / "cut", *ds, "resume=latest", "train.checkpoint_every=5", **glip) == 0

    losses = {r: [m["loss"] for m in metrics(tmp_path / r) if "loss" in m] for r in ("ddp", "full", "cut")}
    # ZeRO's flat gradient buffers sum in another order: ~1e-6 apart, amplified by later steps
    assert len(losses["full"]) == 12 and losses["full"] == pytest.approx(losses["ddp"], rel=1e-3)
    assert losses["cut"] == losses["full"]
    assert sum(losses["full"][-3:]) < sum(losses["full"][:3])
    (full, full_meta), (cut, cut_meta) = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "cut")
    assert full["strategy"] == cut["strategy"] == "deepspeed" and full["step"] == cut["step"] == 12
    assert (Path(cut_meta["path"]) / "deepspeed").is_dir()
    a, b = full_model_state(full_meta["path"], full), full_model_state(cut_meta["path"], cut)
    assert set(a) == set(b) and a["bias0"].shape == ()          # the 0-dim scalars given back their shape
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert cli_main(["evaluate", str(tmp_path / "cut"), "--shards", str(shards), "--detection-classes", "0",
                     "--out", str(tmp_path / "eval")]) == 0
    scores = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert scores["step"] == 12 and scores["grounding_regions"] > 32
