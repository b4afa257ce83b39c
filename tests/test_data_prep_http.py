"""URL inputs fetched from a local HTTP server that also serves broken and slow responses, and
the shard job over URLs: workers, job-array parts and resume after kill -9 give the same bytes."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from baton.cli import main as baton_main

N_GOOD = 24


def _jpeg(seed: int, size=(24, 16)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


class ImageServer(http.server.ThreadingHTTPServer):
    """127.0.0.1 server: /img/N.jpg good images (after `delay` s), /missing.jpg 404, /garbage.jpg
    and /truncated.jpg undecodable, /short.jpg a body shorter than its Content-Length,
    /slow.jpg far beyond any test timeout, /flaky.jpg 503 on the first request then good,
    /down.jpg always 500. `hits` counts requests per path."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.delay = 0.0
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: ImageServer

    def log_message(self, *args):  # keep test output clean
        pass

    def _send(self, status: int, body: bytes = b"", length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path
        with self.server.lock:
            self.server.hits[path] += 1
            hits = self.server.hits[path]
        if path.startswith("/img/"):
            time.sleep(self.server.delay)
            return self._send(200, _jpeg(int(path[5:].split(".")[0])))
        if path == "/garbage.jpg":
            return self._send(200, bytes(np.random.default_rng(1).integers(0, 255, 500, dtype=np.uint8)))
        if path == "/truncated.jpg":
            return self._send(200, _jpeg(99, (64, 64))[:300])
        if path == "/short.jpg":
            self.close_connection = True
            return self._send(200, _jpeg(98)[:40], length=len(_jpeg(98)))
        if path == "/slow.jpg":
            time.sleep(5)
            return self._send(200, _jpeg(97))
        if path == "/flaky.jpg":
            return self._send(503) if hits == 1 else self._send(200, _jpeg(96))
        if path == "/down.jpg":
            return self._send(500)
        return self._send(404)


@pytest.fixture(scope="module")
def server():
    srv = ImageServer()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def _table(path: Path, urls: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["url,caption,license"] + [f"{u},picture {i},cc-by" for i, u in enumerate(urls)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _read(d: Path) -> dict[str, dict]:
    stats = json.loads((d / "stats.json").read_text())
    urls = [str(d / s["name"]) for s in stats["shards"]]
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}


def test_urls_counted_by_reason_and_good_ones_written(server, tmp_path):
    good = [f"{server.url}/img/{i}.jpg" for i in range(3)]
    bad = [f"{server.url}/{p}" for p in ("missing.jpg", "garbage.jpg", "truncated.jpg", "short.jpg",
                                         "slow.jpg", "flaky.jpg", "down.jpg")]
    table = _table(tmp_path / "urls.csv", good + bad)
    out = tmp_path / "out"
    argv = ["shards", "table", str(table), "--image-col", "url", "--out", str(out), "--timeout", "0.5",
            "--retries", "1", "--backoff", "0.01", "--shard-size", "4"]
    t0 = time.perf_counter()
    assert baton_main(argv) == 0
    assert time.perf_counter() - t0 < 15  # the slow URL costs (retries + 1) x timeout, no more
    stats = json.loads((out / "stats.json").read_text())
    assert stats["skipped"] == {"http_404": 1, "undecodable_image": 2, "incomplete_response": 1,
                                "timeout": 1, "http_500": 1}
    assert stats["written"] == 4  # 3 good + flaky (503 once, then served)
    assert server.hits["/flaky.jpg"] == 2 and server.hits["/down.jpg"] == 2  # bounded: 1 retry
    assert server.hits["/missing.jpg"] == 1  # a 404 is not retried
    samples = {json.loads(s["json"])["source"]: s for s in _read(out).values()}
    for i, url in enumerate(good):
        assert samples[url]["jpg"] == _jpeg(i)  # original bytes
        assert samples[url]["txt"].decode() == f"picture {i}"
        assert json.loads(samples[url]["json"])["license"] == "cc-by"
    assert samples[f"{server.url}/flaky.jpg"]["jpg"] == _jpeg(96)


def _digests(d: Path) -> tuple[dict[str, str], dict]:
    shards = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("shard-*.tar"))}
    stats = json.loads((d / "stats.json").read_text())
    stats.pop("throughput")
    return shards, stats


@pytest.mark.slow
def test_workers_parts_and_kill_resume_give_the_same_shards(server, tmp_path):
    urls = [f"{server.url}/img/{i}.jpg" for i in range(N_GOOD)] + [f"{server.url}/missing.jpg"]
    table = _table(tmp_path / "urls.csv", urls)
    base = ["shards", "table", str(table), "--image-col", "url", "--shard-size", "3", "--timeout", "5",
            "--max-side", "12", "--jpeg-quality", "80"]
    ref = tmp_path / "ref"
    assert baton_main([*base, "--out", str(ref)]) == 0
    ref_digests = _digests(ref)
    assert len(ref_digests[0]) == 8 and ref_digests[1]["written"] == N_GOOD  # the 9th: a 404 only

    parts = tmp_path / "parts"  # a job array of 2: the first part alone leaves the set incomplete
    assert baton_main([*base, "--out", str(parts), "--part", "1/2"]) == 0
    assert not (parts / "stats.json").exists()
    assert sorted(p.name for p in parts.glob("shard-*.tar")) == [f"shard-{k:06d}.tar" for k in (1, 3, 5, 7)]
    assert baton_main([*base, "--out", str(parts), "--part", "0/2"]) == 0
    assert _digests(parts) == ref_digests

    # kill -9 a 2-worker run (slowed by the server) after a few shards, then run it again
    killed = tmp_path / "killed"
    server.delay = 0.15
    try:
        cmd = [sys.executable, "-m", "baton", *base, "--out", str(killed), "--workers", "2"]
        proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while len(list((killed / "_progress").glob("chunk-*.json"))) < 2:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no shard recorded within 60 s"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # the main process, the forkserver and the workers
        proc.wait(timeout=30)
    finally:
        server.delay = 0.0
    assert not (killed / "stats.json").exists()
    done = {p.name: p.stat().st_mtime_ns for p in killed.glob("shard-*.tar")}
    assert 2 <= len(done) < 9
    assert baton_main([*base, "--out", str(killed)]) == 0
    assert _digests(killed) == ref_digests  # same keys, same bytes, same stats
    assert {n: (killed / n).stat().st_mtime_ns for n in done} == done  # finished shards untouched
    assert not [p for p in killed.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]
