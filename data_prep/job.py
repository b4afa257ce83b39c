"""The shard job: parallel, resumable, splittable into a job array; the same for every source.

Inputs (a source's plan: `Item`s, ready `Sample`s and planning-time `Skip`s) are numbered in
plan order and cut into chunks of `shard_size` inputs; chunk k becomes `shard-k.tar` (or its
`-NNN` pieces under --shard-max-bytes). What a shard holds therefore depends only on the inputs
and options, never on the number of workers, the timing or the part, so:
- `--workers N` processes write whole chunks independently;
- `--part i/n` writes the chunks k with k % n == i: the union of the parts is one full run;
- when a chunk's shards are renamed into place, `_progress/chunk-k.json` records them with a
  digest of the chunk's inputs and options; a rerun (after kill -9, or of another part) skips
  the chunks whose record matches and whose shard files are there, and redoes the rest.
The run that finds every chunk done writes `stats.json` (merged per-shard stats) and removes
shards and records left over from an earlier, different run. With --dedupe a first pass records
the sha256 of every input image (`_progress/hash-k.json`); an image equal to an earlier input's
(plan order) is skipped as `duplicate`, so which copy is kept is deterministic too.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TextIO

from baton.errors import BatonError
from baton.io import output_dir, write_json_atomic
from baton.progress import progress_bar
from data_prep.items import Item, PrepOptions, content_hash, process_item
from data_prep.writer import SIZES, STATS, Keys, Sample, ShardFiles, Skip

PROGRESS = "_progress"
Plan = Callable[[], Iterable[Item | Sample | Skip]]


@dataclass(frozen=True)
class JobLayout:
    shard_size: int = 500  # inputs per chunk = the most samples a shard holds
    shard_max_bytes: int | None = None
    workers: int = 1
    part: tuple[int, int] = (0, 1)  # (i, n): this run writes chunks k with k % n == i
    timing: bool = True  # throughput in stats.json (off for byte-identical outputs)
    max_logged_skips: int = 10


def _chunks(plan: Plan, layout: JobLayout, planning_skips: Counter | None, log: TextIO | None
            ) -> Iterator[tuple[int, list[Item | Sample]]]:
    """(k, items) in plan order, with unique keys; planning Skips are counted, not chunked."""
    keys, chunk, k = Keys(), [], 0
    for rec in plan():
        if isinstance(rec, Skip):
            if planning_skips is not None:
                if log is not None and sum(planning_skips.values()) < layout.max_logged_skips:
                    print(f"  skipped ({rec.reason}): {rec.where}", file=log)
                planning_skips[rec.reason] += 1
            continue
        chunk.append(replace(rec, key=keys.unique(rec.key)))
        if len(chunk) == layout.shard_size:
            yield k, chunk
            chunk, k = [], k + 1
    if chunk:
        yield k, chunk


def _digest(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=repr)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _identity(item: Item | Sample) -> list[Any]:
    if isinstance(item, Item):
        return item.identity()
    return [item.key, item.caption, item.meta, item.ext, hashlib.sha256(item.image).hexdigest()]


def _record_path(out: Path, kind: str, k: int) -> Path:
    return out / PROGRESS / f"{kind}-{k:06d}.json"


def _load_record(out: Path, kind: str, k: int, digest: str) -> dict | None:
    """The record of chunk k if it matches `digest` and (for chunks) its shard files are there."""
    try:
        rec = json.loads(_record_path(out, kind, k).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if rec.get("digest") != digest:
        return None
    for s in rec.get("shards", []):
        p = out / s["name"]
        if not p.is_file() or p.stat().st_size != s["bytes"]:
            return None
    return rec


def write_chunk(out: Path, k: int, digest: str, items: list[Item | Sample], duplicates: list[int],
                prep: PrepOptions, layout: JobLayout) -> dict[str, Any]:
    """Process and write chunk k, then record it (the record is written after the shards)."""
    t0 = time.perf_counter()
    files, skipped, examples, dups = ShardFiles(out, k, layout.shard_max_bytes), Counter(), [], set(duplicates)
    try:
        for j, item in enumerate(items):
            rec = Skip("duplicate", item.key) if j in dups else process_item(item, prep)
            if isinstance(rec, Skip):
                skipped[rec.reason] += 1
                if len(examples) < layout.max_logged_skips:
                    examples.append([rec.reason, rec.where])
                continue
            files.add(rec)
    except BaseException:
        files.abort()
        raise
    shards = files.close()
    record = {"digest": digest, "shards": shards, "written": sum(s["count"] for s in shards),
              "skipped": dict(sorted(skipped.items())), "examples": examples}
    if layout.timing:
        record["seconds"] = round(time.perf_counter() - t0, 4)
    write_json_atomic(_record_path(out, "chunk", k), record)
    return record


def hash_chunk(out: Path, k: int, digest: str, items: list[Item | Sample], prep: PrepOptions) -> dict:
    record = {"digest": digest, "hashes": [content_hash(it, prep.fetch) for it in items]}
    write_json_atomic(_record_path(out, "hash", k), record)
    return record


_DIED = ("a shard worker process died (killed, or out of memory); finished shards are recorded: "
         "run the same command again to write the rest")


def exit_with_parent(parent_pid: int, poll_s: float = 0.5) -> None:
    """Pool worker initializer: a daemon thread ends this worker once `parent_pid` is gone. A
    forkserver worker's parent is the forkserver, not the `baton shards` process, so neither
    PR_SET_PDEATHSIG nor the pool's own bookkeeping notices a kill -9 of the latter: without this
    the workers go on writing shards, holding their memory, until their queue runs dry."""
    import threading

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:  # the pid was reused by another user's process: ours is gone
                os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class _Runner:
    """Runs chunk tasks in this process (1 worker) or in a process pool, keeping at most
    2 x workers tasks in flight so the plan streams instead of being held in memory. `bar` (a
    progress bar) advances by a task's `size` when the task is done."""

    def __init__(self, workers: int, bar: Any = None) -> None:
        self.bar, self.sizes = bar, {}
        self.pool = None
        if workers > 1:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["data_prep.job"])  # import webdataset/PIL once, not per worker
            self.pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=exit_with_parent,
                                            initargs=(os.getpid(),))
        self.limit = 2 * workers
        self.pending: deque[tuple[int, Future]] = deque()
        self.results: dict[int, dict] = {}

    def submit(self, k: int, fn: Callable, *args: Any, size: int = 0) -> None:
        self.sizes[k] = size
        if self.pool is None:
            self.results[k] = fn(*args)
            self.advance(self.sizes.pop(k))
            return
        while len(self.pending) >= self.limit:
            self._collect_one()
        try:
            self.pending.append((k, self.pool.submit(fn, *args)))
        except BrokenProcessPool:
            raise BatonError(_DIED) from None

    def _collect_one(self) -> None:
        k, fut = self.pending.popleft()
        try:
            self.results[k] = fut.result()
        except BrokenProcessPool:
            raise BatonError(_DIED) from None
        self.advance(self.sizes.pop(k))

    def advance(self, n: int) -> None:
        if self.bar is not None and n:
            self.bar.update(n)

    def finish(self) -> dict[int, dict]:
        try:
            while self.pending:
                self._collect_one()
        finally:
            if self.pool is not None:
                self.pool.shutdown(cancel_futures=True)
        return self.results


def _duplicates(plan: Plan, out: Path, prep: PrepOptions, layout: JobLayout) -> dict[int, list[int]]:
    """Per chunk, the positions whose image bytes equal an earlier input's (first one kept)."""
    digests: dict[int, str] = {}
    with progress_bar(None, "dedupe: hash", unit="sample") as bar:
        runner = _Runner(layout.workers, bar)
        for k, items in _chunks(plan, layout, None, None):
            digests[k] = _digest("hash", [_identity(it) for it in items])
            if _load_record(out, "hash", k, digests[k]) is None:
                runner.submit(k, hash_chunk, out, k, digests[k], items, prep, size=len(items))
            else:
                runner.advance(len(items))
        done = runner.finish()
    seen, dups = set(), {}
    for k in sorted(digests):
        rec = done.get(k) or _load_record(out, "hash", k, digests[k])
        dups[k] = []
        for j, h in enumerate(rec["hashes"]):
            if h is not None and h in seen:
                dups[k].append(j)
            elif h is not None:
                seen.add(h)
    return dups


def _prepare_out(out: Path) -> None:
    output_dir(out, "--out")
    (out / PROGRESS).mkdir(parents=True, exist_ok=True)
    (out / STATS).unlink(missing_ok=True)  # the directory is incomplete until stats.json is back
    (out / SIZES).unlink(missing_ok=True)


def run_job(plan: Plan, out_dir: str | Path, prep: PrepOptions = PrepOptions(),
            layout: JobLayout = JobLayout(), log: TextIO | None = None) -> dict[str, Any]:
    """Write this part's missing chunks; return stats.json's content when every chunk is done,
    else this part's stats with `"complete": False`."""
    if layout.shard_size < 1:
        raise BatonError(f"--shard-size must be at least 1, got {layout.shard_size}")
    if layout.shard_max_bytes is not None and layout.shard_max_bytes < 10240:
        raise BatonError(f"--shard-max-bytes must be at least 10240 (one tar record), got {layout.shard_max_bytes}")
    i, n = layout.part
    out = Path(out_dir)
    t0 = time.perf_counter()
    _prepare_out(out)
    dups = _duplicates(plan, out, prep, layout) if prep.dedupe else {}
    options = prep.fingerprint() | {"shard_max_bytes": layout.shard_max_bytes}
    planning_skips: Counter[str] = Counter()
    digests: dict[int, str] = {}
    # the plan streams, so the bar counts this part's inputs (samples or skips) without a total;
    # chunks an earlier run finished count as they are found
    with progress_bar(None, "shards" if n == 1 else f"shards, part {i}/{n}", unit="sample") as bar:
        runner = _Runner(layout.workers, bar)
        for k, items in _chunks(plan, layout, planning_skips, log):
            digests[k] = _digest(options, dups.get(k, []), [_identity(it) for it in items])
            if k % n != i:
                continue
            if _load_record(out, "chunk", k, digests[k]) is None:
                runner.submit(k, write_chunk, out, k, digests[k], items, dups.get(k, []), prep, layout,
                              size=len(items))
            else:
                runner.advance(len(items))
        written_now = runner.finish()
    seconds = time.perf_counter() - t0

    records = {k: written_now.get(k) or _load_record(out, "chunk", k, d) for k, d in digests.items()}
    _log_examples(written_now, log, layout.max_logged_skips - sum(planning_skips.values()))
    throughput = {"samples": sum(r["written"] for r in written_now.values()), "seconds": round(seconds, 3),
                  "samples_per_s": round(sum(r["written"] for r in written_now.values()) / max(seconds, 1e-9), 2),
                  "worker_seconds": round(sum(r.get("seconds", 0.0) for r in written_now.values()), 3),
                  "workers": layout.workers}
    missing = [k for k, r in records.items() if r is None]
    if missing:
        stats = _merge([r for r in records.values() if r is not None], Counter())
        stats.update(complete=False, chunks_done=len(records) - len(missing), chunks=len(records),
                     throughput=throughput)
        return stats
    stats = _merge([records[k] for k in sorted(records)], planning_skips)
    stats["inputs"] = stats["written"] + sum(stats["skipped"].values())
    stats["plan"] = _digest(sorted(digests.items()), dict(planning_skips))
    if layout.timing:
        stats["throughput"] = throughput
    _remove_stale(out, {s["name"] for s in stats["shards"]}, len(digests))
    write_json_atomic(out / SIZES, {s["name"]: s["count"] for s in stats["shards"]})
    write_json_atomic(out / STATS, stats)
    return stats


def write_shards(records: Iterable[Sample | Skip], out_dir: str | Path, shard_size: int = 500,
                 log: TextIO | None = None, max_logged_skips: int = 10, shard_max_bytes: int | None = None,
                 timing: bool = True) -> dict[str, Any]:
    """Write ready `records` (in-memory Samples, Skips) as shards in `out_dir`; return the stats.

    The serial entry point for sources that make their samples themselves (emoji, tests); it runs
    the same resumable job as `baton shards` (data_prep.job) with one process. `timing=False`
    leaves the clock out of stats.json so that the output is byte-identical for the same input.
    """
    layout = JobLayout(shard_size=shard_size, shard_max_bytes=shard_max_bytes, timing=timing,
                       max_logged_skips=max_logged_skips)
    return run_job(lambda: records, out_dir, layout=layout, log=log)


def _merge(records: list[dict], planning_skips: Counter) -> dict[str, Any]:
    skipped = Counter(planning_skips)
    for r in records:
        skipped.update(r["skipped"])
    shards = [s for r in records for s in r["shards"]]
    total = sum(s["count"] for s in shards)
    return {"num_samples": total, "written": total, "skipped": dict(sorted(skipped.items())),
            "shards": shards, "bytes": sum(s["bytes"] for s in shards)}


def _log_examples(records: dict[int, dict], log: TextIO | None, budget: int) -> None:
    if log is None:
        return
    for k in sorted(records):
        for reason, where in records[k]["examples"]:
            if budget <= 0:
                return
            print(f"  skipped ({reason}): {where}", file=log)
            budget -= 1


def _remove_stale(out: Path, keep: set[str], chunks: int) -> None:
    """Shards and records of an earlier, different run: not part of this set any more; and the
    temporary files of runs killed mid-shard (only now: until every chunk is done, another part
    may still be writing its own)."""
    for stale in out.glob("shard-*.tar"):
        if stale.name not in keep:
            stale.unlink()
    for tmp in [*out.glob(".shard-*.tmp"), *(out / PROGRESS).glob(".*.tmp")]:
        tmp.unlink(missing_ok=True)
    for rec in (out / PROGRESS).glob("*-*.json"):
        try:
            k = int(rec.stem.split("-")[1])
        except (IndexError, ValueError):
            continue
        if k >= chunks:
            rec.unlink()


def describe(stats: dict[str, Any], out: str | Path, part: tuple[int, int]) -> str:
    """One line for a part that did not finish the whole set."""
    return (f"part {part[0]}/{part[1]} done: {stats['chunks_done']} of {stats['chunks']} shards of {out} are "
            f"written; stats.json is written by the run that completes the last one")
