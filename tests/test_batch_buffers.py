"""Reused batch buffers (`pretrain.data.batch_buffers`): a worker refills a buffer only once the
training process holds nothing of it, so batches a consumer keeps are never overwritten."""

from __future__ import annotations

import zlib

import pytest
import torch

from baton.errors import BatonError
from pretrain.data import make_loader, resolve_sources
from pretrain.data.batch_buffers import MAX_POOL, BatchBuffers, FreeBufferReporter
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
    """Stacking row by row into reused buffers gives what torch's default_collate gives for the
    same rows, and what a fresh buffer per batch (no pool) gives."""
    a = [(i.clone(), t.clone(), m["keys"]) for i, t, m in epoch(shards, 2)]
    for images, ids, keys in a:   # keyed_map's rows again from each key and its seed (mod 1000)
        rows = [keyed_map({"__key__": k}, int(seed)) for k, seed in zip(keys, ids[:, 1])]
        want_images, want_ids = torch.utils.data.default_collate(rows)
        assert torch.equal(images, want_images) and torch.equal(ids, want_ids)
    dcfg = data_cfg(shards, workers=2, batch_size=4, mode="epoch_exact")
    sources = resolve_sources(dcfg.train_shards)
    from pretrain.data.loader import EpochStream

    stream = EpochStream(sources, dcfg, keyed_map, seed=0, epoch=0, rank=0, world_size=1, steps=24)  # no pool
    b = list(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2, collate_fn=lambda x: x))
    assert [k for _, _, k in a] == [m["keys"] for *_, m in b]
    for (i, t, _), (i2, t2, _) in zip(a, b):
        assert torch.equal(i, i2) and torch.equal(t, t2)


def test_in_process_pool_reuses_only_what_nobody_holds():
    free_reporter = FreeBufferReporter(workers=0)
    buffers = BatchBuffers(2, free_reporter.channels[0], shared=False)
    row = (torch.zeros(3), torch.zeros(1, dtype=torch.long))

    def batch():   # as pretrain.data.loader._Batches does: report, then make the next batch
        free_reporter.release()
        buffers.add(row, "k0")
        buffers.add(row, "k1")
        columns, slot = buffers.take()
        free_reporter.received(0, slot, columns)
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


def test_uint8_images_keep_pils_layout_and_normalise_to_the_contiguous_floats():
    """PILToTensor's images are (H, W, C) in memory: their batch keeps that layout (a plain copy per
    row), and BatchNormalize gives the same contiguous floats as from a (C, H, W) batch."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms import PILToTensor

    from pretrain.data.uint8_images import BatchNormalize

    rng = np.random.default_rng(0)
    rows = [PILToTensor()(Image.fromarray(rng.integers(0, 255, (6, 5, 3), dtype=np.uint8))) for _ in range(3)]
    buffers = BatchBuffers(3, None, shared=False)
    for i, row in enumerate(rows):
        buffers.add((row, torch.tensor([i])), f"k{i}")
    (images, ids), _ = buffers.take()
    assert images.shape == (3, 3, 6, 5) and images.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(images, torch.stack(rows)) and torch.equal(ids, torch.tensor([[0], [1], [2]]))
    normalize = BatchNormalize((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    floats = normalize(images)
    assert floats.is_contiguous() and torch.equal(floats, normalize(torch.stack(rows).contiguous()))


def test_uint8_rows_normalised_into_the_batch_equal_totensor_normalize():
    """The workers' fused normalisation (a sample map's row_normalize) gives, bit for bit, what the
    sample map's original transform (ToTensor + Normalize) stacked by torch gives."""
    import numpy as np
    from PIL import Image
    from torchvision import transforms as T

    from pretrain.data.uint8_images import split_normalize

    transform = T.Compose([T.Resize((9, 7), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                           T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    uint8_transform, normalize = split_normalize(transform)
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)) for _ in range(4)]
    buffers = BatchBuffers(4, None, shared=False, normalize=normalize)
    for i, image in enumerate(images):
        buffers.add((uint8_transform(image), torch.tensor([i])), f"k{i}")
    (floats, ids), _ = buffers.take()
    assert floats.dtype == torch.float32 and floats.is_contiguous() and ids.dtype == torch.long
    assert torch.equal(floats, torch.stack([transform(image) for image in images]))
    mixed = BatchBuffers(2, None, shared=False, normalize=normalize)
    mixed.add((uint8_transform(images[0]),), "early")
    with pytest.raises(BatonError, match=r"sample late: .*torch.float32 where .*torch.uint8"):
        mixed.add((transform(images[1]),), "late")


@pytest.mark.parametrize("workers", [0, 2])
def test_two_passes_over_one_loader_at_once_keep_their_own_buffers(shards, workers):
    loader = epoch(shards, workers)
    for (a, a_ids, a_meta), (b, b_ids, b_meta) in zip(loader, loader):
        assert a_meta["keys"] == b_meta["keys"]
        check_batch(a, a_ids, a_meta["keys"])
        check_batch(b, b_ids, b_meta["keys"])
