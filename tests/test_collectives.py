"""baton.distributed.all_reduce, the project's one all-reduce: each op against the reduction of the
ranks' tensors computed here, on 2 gloo ranks; in a world of one it returns its argument untouched
(with or without a process group); a mistyped op or a mean of integers is refused by name."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch

from baton.distributed import REDUCE_OPS, all_reduce

VALUES = [torch.tensor([1.0, -2.0, 7.5]), torch.tensor([4.0, 3.0, -0.5])]


def _worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        got = {op: all_reduce(VALUES[rank].clone(), op) for op in REDUCE_OPS}
        got["int_max"] = all_reduce(torch.tensor([rank * 5, 3 - rank], dtype=torch.int32), "max")
        torch.save(got, Path(out) / f"reduced{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_each_op_on_two_ranks_equals_the_reduction_of_their_tensors(tmp_path):
    import torch.multiprocessing as mp

    # fork: the children reuse this process's imports; no CUDA here (conftest: OMP_NUM_THREADS=1)
    mp.start_processes(_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path)),
                       nprocs=2, join=True, start_method="fork")
    stacked = torch.stack(VALUES)
    want = {"sum": stacked.sum(0), "mean": stacked.mean(0), "max": stacked.max(0).values,
            "min": stacked.min(0).values, "int_max": torch.tensor([5, 3], dtype=torch.int32)}
    for rank in range(2):
        got = torch.load(tmp_path / f"reduced{rank}.pt")
        for op, value in want.items():
            torch.testing.assert_close(got[op], value, rtol=0, atol=0, msg=lambda m: f"rank {rank} {op}: {m}")


@pytest.mark.parametrize("op", REDUCE_OPS)
def test_world_of_one_returns_the_tensor_unchanged(op):
    t = torch.tensor([1.0, -2.0, 7.5])
    assert all_reduce(t, op) is t
    torch.testing.assert_close(t, torch.tensor([1.0, -2.0, 7.5]), rtol=0, atol=0)


def test_world_of_one_process_group_returns_the_tensor_unchanged():
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        t = torch.tensor([3.0, 4.0])
        assert all_reduce(t, "mean") is t
        torch.testing.assert_close(t, torch.tensor([3.0, 4.0]), rtol=0, atol=0)
    finally:
        dist.destroy_process_group()


def test_unknown_op_and_integer_mean_are_refused_by_name():
    with pytest.raises(ValueError, match="'avg'.*sum, mean, max, min"):
        all_reduce(torch.zeros(2), "avg")
    with pytest.raises(TypeError, match="'mean'.*torch.int64"):
        all_reduce(torch.zeros(2, dtype=torch.long), "mean")
