"""The training loader: every rank yields the same number of batches, and its position can be saved.

Why it is built like this:
- Each DataLoader worker serves a *logical* worker l of the epoch: batch i of a rank comes from
  logical worker i mod W (the DataLoader hands out worker batches round-robin), and l's stream is
  a pure function of (seed, epoch, rank, l): its shard sequence, shuffle buffer and per-sample
  augmentation seeds. Worker l yields exactly its share of the epoch's `steps` batches (shard
  sequences never run dry: resampled draws forever, epoch-exact starts its shards again if they
  hold too few samples), so all ranks run the same number of steps and DDP never waits forever.
- Every batch carries its worker's `StreamProgress` (samples taken from the shuffle buffer, skips by reason,
  unreadable shards) as of that batch. The main process keeps the latest progress per logical worker:
  that, with the epoch and the batches consumed, is the loader's state (prefetched batches are not
  in it). Resuming rebuilds each worker's stream, replays its shards and shuffle buffer without
  decoding, drops the samples it had consumed, and goes on: exactly the samples of an
  uninterrupted run. A resumed DataLoader starts its round-robin at physical worker 0, so
  physical worker p serves logical worker (p + batches consumed) mod W.
- Skipped-sample counts are logged at a bounded rate and saved in the checkpoint with the position.
"""

from __future__ import annotations

import copy
import ctypes
import itertools
import logging
import platform
import random
import time
from collections import Counter
from typing import Iterable, Iterator

import torch
import webdataset as wds
from webdataset.utils import make_seed

from baton.errors import BatonError
from pretrain.config import DataConfig
from pretrain.data.batch_buffers import BatchBuffers, FreeBufferReporter
from pretrain.data.samples import Rejected, SampleMap, StreamProgress, group_samples, shard_files
from pretrain.data.sources import ShardList, Sources, resolve_sources

MAX_REJECT_RUN = 10_000   # consecutive skips with no usable sample: the data is broken, stop with an error
log = logging.getLogger("baton.data")


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    steps = num_samples // (batch_size * world_size)
    if steps < 1:
        raise BatonError(f"data.num_samples={num_samples} is less than one global batch "
                         f"(data.batch_size={batch_size} x {world_size} ranks); lower data.batch_size")
    return steps


def run_steps_per_epoch(cfg, world_size: int, shards=None) -> tuple[int, int]:
    """(samples per epoch, optimiser steps per epoch) of a pretraining run: data.num_samples (or the
    shards' stats.json) over global batches of data.batch_size x ranks, over train.grad_accum
    micro-batches per step. What the engine schedules by and every method's epochs count
    (`PretrainMethod.steps_per_epoch`); `shards`: the resolved train_shards, when already at hand."""
    if shards is None and not cfg.data.num_samples:
        shards = resolve_sources(cfg.data.train_shards)
    num_samples = cfg.data.num_samples or shards.num_samples
    if not num_samples:
        raise BatonError(f"cannot tell how many samples {cfg.data.train_shards} holds (no stats.json "
                         f"beside the shards, nor img2dataset's NNNNN_stats.json for every shard): "
                         f"set data.num_samples")
    accum = max(1, int(getattr(getattr(cfg, "train", None), "grad_accum", 1) or 1))
    steps = steps_per_epoch(num_samples, cfg.data.batch_size, world_size) // accum
    if steps < 1:
        raise BatonError(f"an epoch of {num_samples} samples holds fewer than train.grad_accum={accum} batches of "
                         f"data.batch_size={cfg.data.batch_size} x {world_size} ranks; lower one of them")
    return num_samples, steps


def _share(logical: int, start: int, steps: int, workers: int) -> int:
    """Batches of [start, steps) that logical worker `logical` serves (those with i mod workers == it)."""
    return len(range(start + (logical - start) % workers, steps, workers))


class EpochStream(torch.utils.data.IterableDataset):
    """One rank's batches of one epoch from batch `start` on; (images, texts, meta) per batch."""

    def __init__(self, sources: Sources, dcfg: DataConfig, sample_map: SampleMap, *, seed: int, epoch: int,
                 rank: int, world_size: int, steps: int, start: int = 0, states: list[dict | None] | None = None):
        super().__init__()
        self.sources, self.dcfg, self.sample_map = sources, dcfg, sample_map
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.steps, self.start = steps, start
        self.workers = max(1, dcfg.workers)
        self.states = states or [None] * self.workers
        self.freed: list | None = None   # FreeBufferReporter's channels, one per logical worker (set per pass)

    def _passes(self, logical: int, where: str) -> Iterator[Iterator[tuple[int, str]]]:
        """Passes over this reader's shards, each a run of (position, url): resampled mode has one
        endless pass of seeded draws; epoch-exact mode reads its share of the epoch's shards, and
        again (reshuffled) if they hold fewer samples than its share of batches."""
        if self.dcfg.mode == "resampled":
            urls = [u for s in self.sources.sources for u in s.urls]
            weights = [s.weight for s in self.sources.sources for _ in s.urls]
            rng = random.Random(make_seed(self.seed, self.epoch, self.rank, logical))
            yield ((n, rng.choices(urls, weights)[0]) for n in itertools.count())
            return
        mine = self.sources.epoch_shards(self.seed, self.epoch)[self.rank::self.world_size][logical::self.workers]
        if not mine:  # check_enough_shards prevents this before training starts
            raise BatonError(f"{where}: no shards for this reader; see data.mode=epoch_exact's shard check")
        for again in itertools.count():
            if again == 1:
                log.warning("%s: read its %d shards and starts them again to fill its share of the epoch "
                            "(data.num_samples is more than these shards hold)", where, len(mine))
            order = mine if again == 0 else random.Random(make_seed(self.seed, self.epoch, self.rank, logical,
                                                                    again)).sample(mine, len(mine))
            yield iter(enumerate(order, start=again * len(mine)))

    def _samples(self, logical: int, progress: StreamProgress) -> Iterator[dict]:
        """Raw samples in training order: each pass grouped and shuffled on its own (the buffer never
        mixes two passes, so epoch-exact mode reads each shard once before any shard twice)."""
        limit = 2 * len(set(self.sources.urls)) + 16
        buffer = self.dcfg.shuffle_buffer
        for p, shards in enumerate(self._passes(logical, progress.where)):
            samples = group_samples(shard_files(shards, progress, limit))
            if buffer > 1:
                rng = random.Random(make_seed(self.seed, self.epoch, self.rank, logical, 1, p))
                samples = wds.shuffle(buffer, min(100, buffer), rng=rng)(samples)
            yield from samples

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        physical = info.id if info is not None else 0
        logical = (physical + self.start) % self.workers
        quota = _share(logical, self.start, self.steps, self.workers)
        if quota == 0:
            return
        where = f"rank {self.rank} worker {logical}"
        progress = StreamProgress(self.states[logical], where)
        base = make_seed(self.seed, self.epoch)
        samples = itertools.islice(self._samples(logical, progress), progress.consumed, None)  # resume: no decoding
        buffers = BatchBuffers(self.dcfg.batch_size, self.freed[logical] if self.freed else None,
                               shared=info is not None, normalize=getattr(self.sample_map, "row_normalize", None))
        keys = []
        for sample in samples:
            index = progress.consumed
            progress.consumed += 1
            try:
                row = self.sample_map(sample, make_seed(base, self.rank * 1000 + logical, index))
            except Rejected as r:
                progress.reject(r.reason, sample["__key__"], sample["__url__"], r.detail)
                progress.reject_run += 1
                if progress.reject_run >= MAX_REJECT_RUN:
                    raise BatonError(f"{where}: {progress.reject_run} samples in a row were unusable "
                                     f"({dict(progress.rejected)}), e.g. {sample['__key__']} in {sample['__url__']}; "
                                     f"fix or rewrite the shards (`baton shards`)") from None
                continue
            progress.reject_run = 0
            keys.append(sample["__key__"])
            # The sample map returns a tuple of tensors (CLIP: image, tokens; DINO: its crops); each
            # goes into its row of the batch at once (batch_buffers: reused shared-memory buffers).
            if buffers.add(row, sample["__key__"]):
                columns, slot = buffers.take()
                yield (*columns, {"worker": logical, "buffer": slot, "keys": keys, "state": progress.state()})
                del columns   # this frame must not hold the batch's buffers (see FreeBufferReporter)
                keys = []
                quota -= 1
                if quota == 0:
                    return


def _as_is(batch: tuple) -> tuple:
    return batch


def _worker_init(_worker_id: int) -> None:
    """Let a worker's freed memory stay in its heap (glibc only; what MALLOC_MMAP_THRESHOLD_ and
    MALLOC_TRIM_THRESHOLD_ do, set per worker, not for the training process).

    Why: a worker allocates and frees several large tensors per sample (a 224 px float image is
    600 KB: ToTensor, Normalize, the crops). With glibc's default thresholds such blocks go back to
    the kernel and come again from it (mmap/munmap, heap trimming: page faults and zeroing), which
    made decoding and transforming in a worker 1.3-1.6x slower than the same work in a plain loop;
    with reused batch buffers it is still worth 3-25 % on 224 px photos (BENCHMARKS.md, loader
    section). A worker's heap then stays at its peak (a few samples).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_threshold = -1, -3   # glibc's malloc.h
    libc.mallopt(m_mmap_threshold, 32 << 20)      # the largest value glibc accepts on 64-bit
    libc.mallopt(m_trim_threshold, 256 << 20)


class _Batches:
    """A DataLoader over an EpochStream that gives every batch's buffers back to the worker that
    filled them once the consumer has let go of them (pretrain.data.batch_buffers)."""

    def __init__(self, stream: EpochStream):
        self.stream = stream

    def __iter__(self) -> Iterator[tuple]:
        workers = max(0, self.stream.dcfg.workers)
        free_reporter = FreeBufferReporter(workers)
        stream = copy.copy(self.stream)    # this pass's: its workers take the channels with it
        stream.freed = free_reporter.channels
        # Batches leave the stream finished (stacked tensors + meta): `_as_is` spares the DataLoader's
        # default_convert, which walks every key and state in the meta dict of every batch.
        # A generator of its own: without one, every pass draws its base seed from torch's global RNG,
        # which a resumed run then draws at the resume (mid-epoch) instead of at the epoch's start,
        # shifting every later random draw of training (DINO's stochastic depth) off the
        # uninterrupted run's. The samples' randomness is seeded per sample, not from this seed.
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                             persistent_workers=False, prefetch_factor=4 if workers else None,
                                             collate_fn=_as_is, worker_init_fn=_worker_init if workers else None,
                                             generator=torch.Generator())
        try:
            for *tensors, meta in loader:
                free_reporter.received(meta["worker"], meta.pop("buffer"), tensors)
                yield (*tensors, meta)
                del tensors
                free_reporter.release()   # before the next batch is made: in-process it can go in a freed buffer
        finally:
            free_reporter.close()


def make_loader(shards: ShardList | Sources, dcfg: DataConfig, sample_map: SampleMap, *, seed: int, epoch: int,
                rank: int, steps: int, world_size: int = 1) -> Iterable[tuple]:
    """One whole epoch on a DataLoader: (images, texts, meta) batches, `steps` of them."""
    sources = shards if isinstance(shards, Sources) else Sources([shards])
    return _Batches(EpochStream(sources, dcfg, sample_map, seed=seed, epoch=epoch, rank=rank,
                                world_size=world_size, steps=steps))


class TrainLoader:
    """One rank's batches epoch after epoch, with a position that `state_dict` saves and restores."""

    def __init__(self, sources: Sources, dcfg: DataConfig, sample_map: SampleMap, *, seed: int, rank: int,
                 world_size: int, steps: int):
        self.sources, self.dcfg, self.sample_map = sources, dcfg, sample_map
        self.seed, self.rank, self.world_size, self.steps = seed, rank, world_size, steps
        self.workers = max(1, dcfg.workers)
        self.epoch, self.batch = 0, 0
        self.states: list[dict | None] = [None] * self.workers
        self.past = Counter()       # skips in finished epochs
        self._logged = (time.monotonic(), 0)

    def _this_epoch(self) -> Counter:
        total = Counter()
        for s in self.states:
            total.update((s or {}).get("rejected", {}))
        return total

    def skipped(self) -> dict[str, int]:
        """Samples and shards skipped so far on this rank (all epochs), by reason."""
        total = self.past + self._this_epoch()
        return dict(sorted(total.items()))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "steps": self.steps, "workers": self.workers,
                "rank": self.rank, "world_size": self.world_size, "mode": self.dcfg.mode,
                "worker_states": list(self.states), "past_skipped": dict(self.past), "skipped": self.skipped()}

    def seek(self, step: int) -> None:
        """Go to global `step` without saved worker states: skip each worker's share of samples
        (exact if nothing was skipped before; otherwise the next samples may differ slightly)."""
        self.epoch, self.batch = divmod(step, self.steps)
        self.states = [{"consumed": _share(w, 0, self.batch, self.workers) * self.dcfg.batch_size}
                       for w in range(self.workers)]

    def load_state_dict(self, state: dict | None, step: int) -> bool:
        """Restore the position saved at global `step`; True if exact. Falls back to `seek` (with a
        warning) when the checkpoint has no loader state or was written with other ranks/workers/epoch length."""
        want = {"steps": self.steps, "workers": self.workers, "world_size": self.world_size,
                "mode": self.dcfg.mode}
        if state and all(state.get(k) == v for k, v in want.items()) and \
                divmod(step, self.steps) == (state["epoch"], state["batch"]):
            self.epoch, self.batch = state["epoch"], state["batch"]
            self.states = list(state["worker_states"])
            self.past = Counter(state.get("past_skipped") or {})
            return True
        saved = {k: state.get(k) for k in want} if state else "none"
        log.warning("rank %d: cannot restore the exact data position (saved loader state: %s; now: %s); "
                    "skipping to step %d by sample counts", self.rank, saved, want, step)
        self.seek(step)
        return False

    def _maybe_log(self, force: bool = False) -> None:
        skipped = self.skipped()
        n = sum(skipped.values())
        now = time.monotonic()
        if n != self._logged[1] and (force or now - self._logged[0] >= self.dcfg.log_skipped_every_s):
            log.warning("rank %d: %d samples/shards skipped so far: %s", self.rank, n,
                        ", ".join(f"{k} {v}" for k, v in skipped.items()))
            self._logged = (now, n)

    def epoch_batches(self) -> Iterator[tuple]:
        """The rest of the current epoch: (*batch tensors, sample keys), e.g. (images, texts, keys); the position advances per batch."""
        stream = EpochStream(self.sources, self.dcfg, self.sample_map, seed=self.seed, epoch=self.epoch,
                             rank=self.rank, world_size=self.world_size, steps=self.steps, start=self.batch,
                             states=list(self.states))
        for *tensors, meta in _Batches(stream):
            self.states[meta["worker"]] = meta["state"]
            self.batch += 1
            if self.batch == self.steps:  # the epoch is done: the position is the next epoch's start
                self._maybe_log(force=True)
                self.past += self._this_epoch()
                self.states = [None] * self.workers
                self.epoch, self.batch = self.epoch + 1, 0
            else:
                self._maybe_log()
            yield (*tensors, meta["keys"])
            del tensors   # so that the batch's buffers can go back to their worker (batch_buffers)
            if self.batch == 0:
                return
        raise BatonError(f"rank {self.rank}: the loader of epoch {self.epoch} ended after batch {self.batch} "
                         f"of {self.steps}; this is a bug in pretrain.data, please report it")
