"""DINO across processes and on the engine: 2 gloo ranks (centre all-reduce, Sinkhorn-Knopp targets,
DDP steps) equal one process on the global batch; FSDP2 equals the plain module; an interrupted and resumed engine run
equals an uninterrupted one, and its checkpoint exports the teacher. Components: tests/test_dino.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from baton.distributed import DistInfo
from pretrain.dino.loss import sinkhorn_knopp_targets, updated_center
from pretrain.dino.method import DinoMethod
from pretrain.dino.model import DinoModel
from test_dino import random_crops, tiny_config, tiny_method

# ------------------------------------------------------------------ 2 ranks, FSDP2

def train_steps(net, method: DinoMethod, batches: list[tuple], total: int) -> None:
    """What the engine does per step, with the method's hooks (one micro-batch per step)."""
    opt = torch.optim.AdamW(method.param_groups(net), lr=1e-2)
    for step, crops in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = 1e-2
        method.adjust_optimizer(opt, step, total)
        loss, _ = method.loss(net, crops, step, total)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            method.after_step(getattr(net, "module", net), step, total)


def global_batches(method: DinoMethod, steps: int, batch: int) -> list[tuple]:
    return [random_crops(method.dino, batch, seed=100 + s) for s in range(steps)]


def _ddp_worker(rank: int, world: int, init: str, rows: list[torch.Tensor], center: torch.Tensor,
                out: str) -> None:
    import torch.distributed as dist

    from datetime import timedelta

    torch.set_num_threads(1)
    # a bounded wait: a rank that dies before joining fails the test instead of hanging it
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        torch.save(updated_center(center, rows[rank], 0.9), Path(out) / f"center{rank}.pt")
        torch.save(sinkhorn_knopp_targets(rows[rank], 0.07, 3), Path(out) / f"sinkhorn{rank}.pt")
        # two DINO steps under DDP, each rank on its half of the global batch of 8
        method = tiny_method(num_samples=64, batch_size=4)
        method.info = DistInfo(rank=rank, world_size=world)
        torch.manual_seed(0)
        model = method.build_model()
        net = torch.nn.parallel.DistributedDataParallel(model)
        halves = [tuple(c[rank * 4:(rank + 1) * 4] for c in crops) for crops in global_batches(method, 2, 8)]
        train_steps(net, method, halves, total=10)
        torch.save(model.state_dict(), Path(out) / f"model{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_single_process_on_the_global_batch(tmp_path):
    """The centre all-reduce (ranks of different batch sizes) and two whole DDP steps (gradients,
    centre, EMA teacher) on 2 gloo ranks equal one process on the same global batch."""
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    center = torch.randn(1, 10)
    rows = [torch.randn(6, 10), torch.randn(4, 10)]   # rank batches of different sizes
    # fork: the children reuse this process's imports (spawn would import torch, timm, ... twice more);
    # safe here: no CUDA, and conftest sets OMP_NUM_THREADS=1 (no OpenMP pool to inherit)
    mp.start_processes(_ddp_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", rows, center, str(tmp_path)),
                       nprocs=2, join=True, start_method="fork")
    single = updated_center(center, torch.cat(rows), 0.9)
    balanced = sinkhorn_knopp_targets(torch.cat(rows), 0.07, 3).split([6, 4])
    for r in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"center{r}.pt"), single, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(torch.load(tmp_path / f"sinkhorn{r}.pt"), balanced[r], rtol=1e-5, atol=1e-7)

    method = tiny_method(num_samples=64, batch_size=8)   # the same global batch in one process
    torch.manual_seed(0)
    model = method.build_model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model, method, global_batches(method, 2, 8), total=10)
    for r in range(2):
        got = torch.load(tmp_path / f"model{r}.pt")
        for k, v in model.state_dict().items():
            torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5, msg=lambda m: f"rank {r} {k}: {m}")
    assert not torch.allclose(model.center, initial["center"])
    assert not torch.allclose(model.state_dict()["teacher.backbone.blocks.0.attn.qkv.weight"],
                              initial["teacher.backbone.blocks.0.attn.qkv.weight"])


@pytest.mark.slow
def test_fsdp2_world_of_one_equals_unwrapped():
    """fully_shard over shard_units + root (DTensor parameters, the weight-norm parametrisation, the
    EMA in after_step) trains exactly like the plain module, and its full state dict exports."""
    import copy

    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    method = tiny_method()
    torch.manual_seed(0)
    plain = method.build_model()
    sharded = copy.deepcopy(plain)
    batches = global_batches(method, 2, 4)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for unit in method.shard_units(sharded):
            fully_shard(unit)
        fully_shard(sharded)
        train_steps(sharded, method, batches, total=10)
        full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    finally:
        dist.destroy_process_group()
    train_steps(plain, method, batches, total=10)
    assert set(full) == set(plain.state_dict())
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(full[k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


# ------------------------------------------------------------------ on the engine: resume and export

def run_engine(shards: Path, run_dir: Path, *overrides: str) -> int:
    """`baton pretrain` with method=dino and the tiny model (`cfg.dino` set on the config object:
    the same whether or not PretrainConfig declares the field yet)."""
    from baton.config import load_config
    from pretrain.config import PretrainConfig
    from pretrain.train import train

    cfg = load_config(PretrainConfig, None, [
        f"data.train_shards={shards}", f"run_dir={run_dir}", "method=dino", "data.batch_size=8", "data.workers=1",
        "train.epochs=2", "train.log_every=100", "train.threads=1", "optim.warmup_steps=2", *overrides])
    cfg.dino = tiny_config()
    return train(cfg)


@pytest.mark.slow
def test_engine_resume_equals_uninterrupted_and_exports(synthetic_shards, tmp_path):
    """16 steps (8 per epoch: the last layer unfreezes at step 8) straight, and cut after step 6
    then resumed: identical student, teacher and centre; the teacher exports as a timm handoff."""
    from baton.checkpoint import load_checkpoint
    from finetune.model import load_backbone
    from pretrain.strategies import full_model_state

    assert run_engine(synthetic_shards, tmp_path / "full", "train.checkpoint_every=100") == 0
    run_engine(synthetic_shards, tmp_path / "cut", "train.stop_after_steps=6", "train.checkpoint_every=3")
    assert run_engine(synthetic_shards, tmp_path / "cut", "resume=latest", "train.checkpoint_every=3") == 0
    (full, full_meta), (cut, cut_meta) = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "cut")
    assert full["step"] == cut["step"] == 16
    a, b = full_model_state(full_meta["path"], full), full_model_state(cut_meta["path"], cut)
    assert set(a) == set(b) and "center" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["center"], torch.zeros_like(a["center"]))
    out = tiny_method().export(a, tmp_path / "export")
    backbone, meta = load_backbone(out)
    x = torch.randn(2, 3, 32, 32)
    teacher = {k[len("teacher.backbone."):]: v for k, v in a.items() if k.startswith("teacher.backbone.")}
    reference = DinoModel(tiny_config()).teacher.backbone
    reference.load_state_dict(teacher)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), reference.eval()(x))


@pytest.mark.slow
def test_uint8_image_handoff_trains_the_same_weights(synthetic_shards, tmp_path):
    """Crops handed over by the worker as uint8 and normalised by the method on arrival (what a GPU
    run does) train exactly the weights of crops normalised in the worker."""
    from baton.checkpoint import load_checkpoint
    from pretrain.strategies import full_model_state

    states = []
    for handoff in ("float", "uint8"):
        run = tmp_path / handoff
        assert run_engine(synthetic_shards, run, f"data.image_handoff={handoff}", "train.max_steps=4") == 0
        state, meta = load_checkpoint(run)
        states.append(full_model_state(meta["path"], state))
    a, b = states
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
