"""Reused batch buffers (`pretrain.data.batch_buffers`): a worker refills a buffer only once the
training process holds nothing of it, so batches a consumer keeps are never overwritten."""

from __future__ import annotations

import zlib

import pytest
import torch

from baton.errors import BatonError
from pretrain.data import make_loader, resolve_sources
from pretrain.data.batch_buffers import MAX_POOL, BatchBuffers, GiveBack
from test_loader import data_cfg, write_good_shards


def key_code(key: str) -> float:
    return float(zlib.crc32(key.encode()) % 100_000)


def keyed_map(sample: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A sample map whose tensors say which sample they came from (and are big enough to be worth reusing)."""
    code = key_code(sample["__key__"])
    return torch.full((3, 16, 16), code), torch.tensor([int(code), seed % 1000])


def check_batch(images: torch.Tensor, ids: torch.Tensor, keys: list[str]) -> None:
    want = torch.tensor([key_code(k) for k in keys])
    assert torch.equal(images.flatten(1).min(1).values, want) and torch.equal(images.flatten(1).max(1).values, want)
    assert torch.equal(ids[:, 0], want.long())


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("buffers")
    write_good_shards(out, shards=8, per_shard=12)
    return out


def epoch(shards, workers: int):
    dcfg = data_cfg(shards, workers=workers, batch_size=4, mode="epoch_exact")
    sources = resolve_sources(dcfg.train_shards)
    return make_loader(sources, dcfg, keyed_map, seed=0, epoch=0, rank=0, steps=24)


@pytest.mark.parametrize("workers", [0, 2])
def test_kept_batches_are_never_overwritten_and_dropped_ones_are_reused(shards, workers):
    # The consumer keeps every third batch and drops the others: the kept ones must still hold
    # their own samples at the end, and the dropped ones' buffers must have been filled again.
    kept, seen, n = [], set(), 0
    for images, ids, meta in epoch(shards, workers):
        check_batch(images, ids, meta["keys"])
        seen.add(images.untyped_storage().data_ptr())
        if n % 3 == 0:
            kept.append((images, ids, meta["keys"]))
        n += 1
        del images, ids
    assert n == 24 and len(kept) == 8
    for images, ids, keys in kept:
        check_batch(images, ids, keys)
    assert len({images.untyped_storage().data_ptr() for images, _, _ in kept}) == len(kept)
    assert len(seen) < n - len(kept)   # buffers were reused ...
    assert len(seen) <= len(kept) + MAX_POOL * max(workers, 1) + 1   # ... within the pool's bound


@pytest.mark.parametrize("workers", [0, 2])
def test_a_consumer_that_keeps_every_batch_gets_them_all_intact(shards, workers):
    batches = list(epoch(shards, workers))
    assert len(batches) == 24
    for images, ids, meta in batches:
        check_batch(images, ids, meta["keys"])
    # Views and numpy arrays hold a batch as well as the tensor does.
    views = [(images[1:], images.numpy(), meta["keys"]) for images, _, meta in epoch(shards, workers)]
    for view, array, keys in views:
        assert torch.equal(view.flatten(1)[:, 0], torch.tensor([key_code(k) for k in keys[1:]]))
        assert (array.reshape(len(keys), -1)[:, 0] == [key_code(k) for k in keys]).all()


def test_the_same_batches_as_torch_default_collate(shards):
    """Stacking row by row into reused buffers gives what stacking a batch's samples at the end gives."""
    a = [(i.clone(), t.clone(), m["keys"]) for i, t, m in epoch(shards, 2)]
    dcfg = data_cfg(shards, workers=2, batch_size=4, mode="epoch_exact")
    sources = resolve_sources(dcfg.train_shards)
    from pretrain.data.loader import EpochStream

    stream = EpochStream(sources, dcfg, keyed_map, seed=0, epoch=0, rank=0, world_size=1, steps=24)
    b = list(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2, collate_fn=lambda x: x))
    assert [k for _, _, k in a] == [m["keys"] for *_, m in b]
    for (i, t, _), (i2, t2, _) in zip(a, b):
        assert torch.equal(i, i2) and torch.equal(t, t2)


def test_in_process_pool_reuses_only_what_nobody_holds():
    give_back = GiveBack(workers=0)
    buffers = BatchBuffers(2, give_back.channels[0], shared=False)
    row = (torch.zeros(3), torch.zeros(1, dtype=torch.long))

    def batch():   # as pretrain.data.loader._Batches does: report, then make the next batch
        give_back.release()
        buffers.add(row, "k0")
        buffers.add(row, "k1")
        columns, slot = buffers.take()
        give_back.received(0, slot, columns)
        return columns, slot

    first, s1 = batch()
    second, s2 = batch()              # `first` is still held: a new slot
    assert s2 != s1
    del first
    third, s3 = batch()               # `first` was let go of: its slot is filled again
    assert s3 == s1
    view = third[0][1:]
    del third
    _, s4 = batch()                   # a view of `third` is alive: not reused
    assert s4 not in (s1, s2)


def test_rows_that_disagree_in_shape_or_dtype_name_the_sample():
    buffers = BatchBuffers(3, None, shared=False)
    buffers.add((torch.zeros(3, 4, 4),), "first")
    with pytest.raises(BatonError, match=r"sample odd: .*\(3, 5, 5\).*\(3, 4, 4\)"):
        buffers.add((torch.zeros(3, 5, 5),), "odd")
    with pytest.raises(BatonError, match=r"sample wide: .*float64"):
        buffers.add((torch.zeros(3, 4, 4, dtype=torch.float64),), "wide")
    with pytest.raises(BatonError, match="sample two: .*returned 2 tensors"):
        buffers.add((torch.zeros(3, 4, 4), torch.zeros(1)), "two")
    with pytest.raises(BatonError, match="tuple of tensors"):
        BatchBuffers(3, None, shared=False).add(("a caption",), "text")
