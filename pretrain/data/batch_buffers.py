"""Batch buffers that a loader worker fills again once the training process has let go of them.

Why: torch's `default_collate` stacks every batch into a newly allocated block of shared memory,
and the first write to each page of it is a page fault (the kernel zeroes and maps the page). For
224 px float images that is 38 MB a batch of 64; on the CI machine it cost 0.55 ms a sample, a
quarter of what decoding and transforming the sample costs (BENCHMARKS.md, loader section). Here a
worker keeps the blocks it has sent and stacks a later batch into one of them again once the
training process reports it free; it also copies each sample into its row as soon as it is made,
while it is still in the cache, instead of keeping the batch's samples and stacking them at the end.

Why this is safe: the training process keeps its own reference to the storages of every batch it
receives and reports a buffer free only when that reference is the only one left in the process
(the storage's use count): no tensor, view or numpy array of the batch is alive. A batch that the
consumer keeps (a list of batches, a tensor stored away) is never reported, and the worker then
allocates a new buffer, as torch does; a worker keeps at most `MAX_POOL` buffers.

The channel back is a pipe per worker (a deque when the loader runs in the training process, with
`data.workers=0`); a report is a slot number, and a slot is reported at most once before the worker
sends it again, so a pipe never holds more than `MAX_POOL` small messages (writing never blocks).
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from multiprocessing.connection import Connection

import torch

from baton.compat import storage_use_counter
from baton.errors import BatonError

MAX_POOL = 8   # buffers a worker keeps: prefetch_factor (4) + the batches the consumer holds + the one being filled
Channel = Connection | deque
# How many references a tensor storage has in this process (tensors, views, storage objects); None
# where torch has no such function (baton/compat.py): then buffers are simply not reused.
_use_count = storage_use_counter()


class BatchBuffers:
    """Worker side: stacks one batch at a time, row by row, into a reused or a new buffer.

    A row is the tuple of tensors the sample map returns (CLIP: image, tokens; DINO: its crops);
    column i of the batch stacks position i of every row. Rows must agree in shape and dtype.
    With `normalize` (the sample map's `row_normalize`), uint8 images go into float32 columns and
    are normalised there, in place: ToTensor + Normalize's result without their three intermediate
    tensors and the final copy (bit for bit the same; 1.1-1.2x faster a 224 px photo).
    """

    def __init__(self, batch_size: int, freed: Channel | None, shared: bool, normalize=None):
        self.batch_size, self.freed, self.shared, self.normalize = batch_size, freed, shared, normalize
        self.normalized: list[bool] = []   # per column: uint8 rows normalised into float32
        self.pool: list[tuple[torch.Tensor, ...]] = []   # slot -> the column buffers
        self.free: list[int] = []
        self.columns: tuple[torch.Tensor, ...] | None = None
        self.slot, self.rows = -1, 0

    def add(self, row: tuple, key: str) -> bool:
        """Copy `row` (of sample `key`) into the batch; True when the batch is full."""
        if self.rows == 0:
            self._start(row, key)
        if len(row) != len(self.columns):
            raise BatonError(f"sample {key}: the sample map returned {len(row)} tensors, the batch's earlier "
                             f"samples {len(self.columns)}")
        for column, x, normalized in zip(self.columns, row, self.normalized):
            want = torch.uint8 if normalized else column.dtype
            if not isinstance(x, torch.Tensor) or x.shape != column.shape[1:] or x.dtype != want:
                got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
                raise BatonError(f"sample {key}: the sample map returned {got} where the batch's earlier samples "
                                 f"have {tuple(column.shape[1:])} {want}; every sample must give tensors of "
                                 f"one shape (check the transform's crop/resize sizes)")
            column[self.rows].copy_(x)
            if normalized:
                self.normalize.in_place(column[self.rows])
        self.rows += 1
        return self.rows == self.batch_size

    def take(self) -> tuple[tuple[torch.Tensor, ...], int]:
        """The full batch's columns and its slot (-1: a buffer that is not reused). The columns are
        new tensors on the buffers' storages: a consumer in this process (`data.workers=0`) must not
        share the pool's own tensor objects, or the storages' use counts would not see it."""
        columns, slot = tuple(c.detach() for c in self.columns), self.slot
        self.columns, self.slot, self.rows = None, -1, 0
        return columns, slot

    def _start(self, row: tuple, key: str) -> None:
        if not row or not all(isinstance(x, torch.Tensor) for x in row):
            raise BatonError(f"sample {key}: the sample map must return a tuple of tensors, "
                             f"not {type(row).__name__} of {[type(x).__name__ for x in row]}")
        self.normalized = [self.normalize is not None and x.dtype == torch.uint8 for x in row]
        spec = [(x.shape, torch.float32, False) if n else (x.shape, x.dtype, _channels_last(x))
                for x, n in zip(row, self.normalized)]
        self._collect()
        if self.free:
            self.slot = self.free.pop()
            if [(c.shape[1:], c.dtype, _channels_last(c[0])) for c in self.pool[self.slot]] != spec:
                self.pool[self.slot] = self._new(spec)
        elif self.freed is not None and len(self.pool) < MAX_POOL:
            self.slot = len(self.pool)
            self.pool.append(self._new(spec))
        else:
            self.slot = -1
            self.columns = self._new(spec)
            return
        self.columns = self.pool[self.slot]

    def _collect(self) -> None:
        if isinstance(self.freed, deque):
            while self.freed:
                self.free.append(self.freed.popleft())
        elif self.freed is not None:
            while self.freed.poll():
                self.free.append(int.from_bytes(self.freed.recv_bytes(), "little"))

    def _new(self, spec: list) -> tuple[torch.Tensor, ...]:
        columns = tuple(torch.empty((self.batch_size, *shape), dtype=dtype,
                                    memory_format=torch.channels_last if last else torch.contiguous_format)
                        for shape, dtype, last in spec)
        return tuple(c.share_memory_() for c in columns) if self.shared else columns


def _channels_last(x: torch.Tensor) -> bool:
    """Whether a (C, H, W) sample is laid out as (H, W, C), as PILToTensor's uint8 images are (a view
    of PIL's pixels). Its batch then keeps that layout (torch.channels_last): copying a row is a plain
    copy, where a (C, H, W)-contiguous batch would make it a transposing one (0.13 ms a 224 px image,
    a tenth of decoding it). The values and shape are the same; BatchNormalize makes it contiguous on
    the device."""
    return x.dim() == 3 and not x.is_contiguous() and x.permute(1, 2, 0).is_contiguous()


class FreeBufferReporter:
    """Training-process side: reports a batch's buffers free to the worker that filled them once
    nothing in this process holds them any more. One per pass over a DataLoader (its workers' pipes)."""

    def __init__(self, workers: int):
        self.in_process = workers == 0
        if self.in_process:
            self.channels: list[Channel] = [deque()]
            self._writers = []
        else:
            pipes = [multiprocessing.Pipe(duplex=False) for _ in range(workers)]
            self.channels = [reader for reader, _ in pipes]
            self._writers = [writer for _, writer in pipes]
        # In-process the worker's pool holds one more reference to every buffer.
        self._alone = 2 if self.in_process else 1
        self.held: dict[tuple[int, int], list] = {}     # (worker, slot) -> storages the consumer may still use
        self.mapped: dict[tuple[int, int], list] = {}   # reported free; kept so that its return maps nothing new

    def received(self, worker: int, slot: int, columns) -> None:
        if slot >= 0:
            self.mapped.pop((worker, slot), None)
            self.held[(worker, slot)] = [c.untyped_storage() for c in columns]

    def release(self) -> None:
        """Report every held batch that nothing else in this process refers to any more."""
        if _use_count is None:   # a torch without it: no buffer is reported, every batch gets a new one
            return
        for key, storages in list(self.held.items()):
            if all(_use_count(s) == self._alone for s in storages):
                self.mapped[key] = self.held.pop(key)
                worker, slot = key
                if self.in_process:
                    self.channels[0].append(slot)
                else:
                    self._writers[worker].send_bytes(slot.to_bytes(4, "little"))

    def close(self) -> None:
        for c in [*self._writers, *(c for c in self.channels if isinstance(c, Connection))]:
            c.close()
        self.held.clear()
        self.mapped.clear()
