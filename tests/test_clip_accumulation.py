"""CLIP's full-batch gradient accumulation (pretrain/clip/accumulation.py) against references, float64 on CPU.

- one step of train.grad_accum=4 x 2 samples gives the gradients (logit scale included), the loss
  and the parameters after the optimiser step of one batch of 8, in one process and over 2 DDP
  ranks (2 x 4 x 2 against one process with 16), also under FSDP2; plain accumulation
  (`clip.accum_loss: micro_batch`, the behaviour before) does not;
- with patch dropout (random in train mode) and with a BatchNorm image tower (small_convnet) it
  equals the same loss built in one autograd graph over the micro-batches' features, and the
  BatchNorm running statistics are updated once per micro-batch (not also by the feature pass);
- through the engine and the loader it trains the weights of the big batch, and resumes exactly.

Pytest runs the tests; torchrun runs this file as a script (`_worker`) for the 2-rank checks.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_pretrain import TINY_MODEL

REPO = Path(__file__).resolve().parents[1]
SMALL_CONVNET = {"name": "test-small-convnet",
                 "config": {"embed_dim": 32,
                            "vision_cfg": {"image_size": 32, "timm_model_name": "small_convnet", "timm_pool": "flatten",
                                           "timm_proj": "linear"},
                            "text_cfg": TINY_MODEL["config"]["text_cfg"]}}
PATCH_DROPOUT = {"name": "test-tiny-patch-dropout",
                 "config": {**TINY_MODEL["config"],
                            "vision_cfg": {**TINY_MODEL["config"]["vision_cfg"], "patch_dropout": 0.5}}}


def setup(model_cfg: dict, accum: int, batch: int, accum_loss: str = "full_batch", strategy: str = "ddp", info=None):
    """(method, strategy, net) of a float64 CLIP, the same initial weights for the same model_cfg."""
    import pretrain.models  # noqa: F401  (registers small_convnet with timm)
    from baton.distributed import DistInfo
    from pretrain.clip.config import ClipConfig
    from pretrain.clip.method import ClipMethod
    from pretrain.config import pretrain_config
    from pretrain.strategies import strategy_class

    cfg = pretrain_config(clip=ClipConfig(**copy.deepcopy(model_cfg), accum_loss=accum_loss))
    cfg.train.grad_accum, cfg.data.batch_size, cfg.train.device, cfg.train.strategy = accum, batch, "cpu", strategy
    info = info or DistInfo()
    method = ClipMethod(cfg, info)
    torch.manual_seed(0)
    model = method.build_model().double()
    s = strategy_class(strategy)(cfg, info, method)
    net, _ = s.setup(model, method.param_groups)
    return method, s, net


def data(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(1, 1000, (n, 16), generator=g)


def one_step(method, strategy, net, images, texts, accum: int) -> dict:
    """Run one optimiser step on `accum` equal micro-batches of (images, texts); return the loss,
    the gradients before the step and the parameters and buffers after it."""
    size = len(images) // accum
    micro = [(images[i * size:(i + 1) * size], texts[i * size:(i + 1) * size]) for i in range(accum)]
    for group in strategy.optimizer.param_groups:
        group["lr"] = 1e-3
    torch.manual_seed(5)   # patch dropout's draws
    losses, _ = method.accumulate(net, strategy, iter(micro), 0, 1)
    grads = {n: _full(p.grad).clone() for n, p in strategy.model.named_parameters() if p.grad is not None}
    strategy.step(None)
    return {"loss": [float(v) for v in losses], "grads": grads,
            "params": {n: _full(p.detach()).clone() for n, p in strategy.model.named_parameters()},
            "buffers": {n: b.clone() for n, b in strategy.model.named_buffers()}}


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def one_graph_reference(model_cfg: dict, images, texts, accum: int) -> dict:
    """The definition of the full-batch loss: every micro-batch forwarded once with gradients (in
    order, so the same random draws), the contrastive loss over their concatenated features, one
    backward through the whole graph (all micro-batches' activations held at once)."""
    method, strategy, net = setup(model_cfg, 1, len(images))
    size = len(images) // accum
    torch.manual_seed(5)
    parts = [method.features(net, (images[i * size:(i + 1) * size], texts[i * size:(i + 1) * size]))
             for i in range(accum)]
    loss = method.loss_fn()(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), parts[-1][2])
    loss.backward()
    return {"loss": [loss.item()], "grads": {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None},
            "buffers": {n: b.clone() for n, b in net.named_buffers()}}


def test_full_batch_accumulation_equals_one_big_batch():
    images, texts = data(8)
    big = one_step(*setup(TINY_MODEL, 1, 8), images, texts, 1)
    accumulated = one_step(*setup(TINY_MODEL, 4, 2), images, texts, 4)
    assert "logit_scale" in big["grads"] and len(big["grads"]) > 10
    assert max(g.abs().max().item() for g in big["grads"].values()) > 1e-3   # not trivially zero
    assert abs(accumulated["loss"][0] - big["loss"][0]) < 1e-6   # the float32 logged
    assert max_diff(accumulated["grads"], big["grads"]) < 1e-12
    assert abs(accumulated["grads"]["logit_scale"] - big["grads"]["logit_scale"]).item() < 1e-12
    assert max_diff(accumulated["params"], big["params"]) < 1e-12
    # plain accumulation of each micro-batch's own loss (clip.accum_loss: micro_batch, what
    # train.grad_accum did before) contrasts 2 pairs at a time: other gradients
    plain = one_step(*setup(TINY_MODEL, 4, 2, accum_loss="micro_batch"), images, texts, 4)
    assert max_diff(plain["grads"], big["grads"]) > 1e-3


@pytest.mark.parametrize("model_cfg", [PATCH_DROPOUT, SMALL_CONVNET], ids=["patch_dropout", "batchnorm"])
def test_random_draws_and_batchnorm_match_the_one_graph_loss(model_cfg):
    images, texts = data(8)
    reference = one_graph_reference(model_cfg, images, texts, 4)
    accumulated = one_step(*setup(model_cfg, 4, 2), images, texts, 4)
    assert abs(accumulated["loss"][0] - reference["loss"][0]) < 1e-6
    assert max_diff(accumulated["grads"], reference["grads"]) < 1e-12
    # running statistics updated by the 4 gradient-pass forwards only, exactly as the reference's 4
    assert accumulated["buffers"].keys() == reference["buffers"].keys()
    assert all(torch.equal(b, reference["buffers"][n]) for n, b in accumulated["buffers"].items())
    if model_cfg is SMALL_CONVNET:
        tracked = [b for n, b in accumulated["buffers"].items() if n.endswith("num_batches_tracked")]
        assert tracked and all(int(b) == 4 for b in tracked)
    else:  # the draws matter: one graph without them (no dropout) gives other gradients
        big = one_step(*setup(TINY_MODEL, 1, 8), images, texts, 1)
        assert max_diff(accumulated["grads"], big["grads"]) > 1e-4


def test_accum_loss_is_checked():
    from baton.errors import BatonError

    with pytest.raises(BatonError, match=r"^unknown clip.accum_loss 'full' \(did you mean 'full_batch'\?\): choose one of full_batch, micro_batch$"):
        setup(TINY_MODEL, 2, 2, accum_loss="full")


@pytest.mark.slow
def test_training_with_full_batch_accumulation_resumes_exactly(tmp_path, synthetic_shards):
    """Through the engine and the loader (a worker process, its batch buffers held for the step):
    grad_accum=2 x 8 trains the weights of batches of 16 (float32), and a run cut after step 3
    and resumed from its step-2 checkpoint ends bit for bit where the uninterrupted one does."""
    from baton.checkpoint import load_checkpoint
    from baton.cli import main as cli_main
    from test_pretrain import write_tiny_config

    cfg = write_tiny_config(tmp_path / "c.yaml", tmp_path / "unused", synthetic_shards,
                            data={"workers": 1, "batch_size": 8}, train={"grad_accum": 2, "checkpoint_every": 2})
    full, cut, big = tmp_path / "full", tmp_path / "cut", tmp_path / "big"   # 64 samples: 4 steps of 16
    assert cli_main(["pretrain", str(cfg), f"run_dir={full}"]) == 0
    assert cli_main(["pretrain", str(cfg), f"run_dir={cut}", "train.stop_after_steps=3"]) == 0
    assert load_checkpoint(cut)[0]["step"] == 2
    assert cli_main(["pretrain", str(cfg), f"run_dir={cut}", "resume=latest"]) == 0
    assert cli_main(["pretrain", str(cfg), f"run_dir={big}", "data.batch_size=16", "train.grad_accum=1"]) == 0
    a, b, c = (load_checkpoint(run)[0] for run in (full, cut, big))
    assert a["step"] == b["step"] == c["step"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert max_diff(a["model"], c["model"]) < 1e-5


# ---------------------------------------------------------------- 2 ranks (gloo)

@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("accum2")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           __file__, str(out)], env=env, cwd=out, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_full_batch_accumulation_over_two_ranks_equals_one_big_batch(two_ranks, strategy):
    """2 ranks x 4 micro-batches of 2 == one process with a batch of 16 (features gathered over ranks)."""
    result = two_ranks[strategy]
    assert result["loss_diff"] < 1e-6 and result["param_diff"] < 1e-12, result
    if strategy == "ddp":
        assert result["grad_diff"] < 1e-12 and result["grad_abs"] > 1e-3, result
        assert result["plain_grad_diff"] > 1e-3, result   # micro_batch: 2 x 2 pairs at a time
        assert result["ranks_equal"], result               # DDP's replicas stay identical


def _worker(out: Path) -> None:
    import torch.distributed as dist

    from baton.distributed import init_distributed

    info = init_distributed("cpu")
    images, texts = data(16)
    mine = slice(8 * info.rank, 8 * (info.rank + 1))
    reference = one_step(*setup(TINY_MODEL, 1, 16), images, texts, 1) if info.rank == 0 else None
    result = {}
    for strategy in ("ddp", "fsdp"):
        got = one_step(*setup(TINY_MODEL, 4, 2, strategy=strategy, info=info), images[mine], texts[mine], 4)
        losses, sums = [None, None], [None, None]   # each rank's loss is its rows' share (ClipLoss local_loss)
        dist.all_gather_object(losses, got["loss"][0])
        dist.all_gather_object(sums, sum(p.sum().item() for p in got["params"].values()))
        if strategy == "ddp":
            plain = one_step(*setup(TINY_MODEL, 4, 2, accum_loss="micro_batch", info=info), images[mine], texts[mine], 4)
        if info.rank == 0:
            result[strategy] = {"loss_diff": abs(sum(losses) / 2 - reference["loss"][0]),
                                "param_diff": max_diff(got["params"], reference["params"])}
            if strategy == "ddp":
                result[strategy].update(grad_diff=max_diff(got["grads"], reference["grads"]),
                                        grad_abs=max(g.abs().max().item() for g in reference["grads"].values()),
                                        plain_grad_diff=max_diff(plain["grads"], reference["grads"]),
                                        ranks_equal=sums[0] == sums[1])
    if info.rank == 0:
        (out / "result.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
