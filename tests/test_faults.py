"""Faults around checkpoints and resume, in both training stages: a dangling or deleted `latest`,
a truncated or malicious `state.pt`, a rerun without `resume` into a used run directory, and a
loss that stops being finite. Each must keep the good checkpoints and say what to do."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from baton.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from baton.cli import main as cli_main
from baton.errors import BatonError
from test_pretrain import write_tiny_config
from conftest import descendant_pids


def three_steps(root: Path) -> list[Path]:
    return [save_checkpoint(root, s, {"w": torch.full((3,), float(s)), "step": s}, keep_last=5) for s in (1, 2, 3)]


def test_latest_falls_back_to_the_newest_intact_step(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    s1, s2, s3 = three_steps(root)
    assert latest_checkpoint(root) == s3
    (root / "latest").write_text("step_000009\n")          # dangling pointer
    assert latest_checkpoint(root) == s3 and "newest intact" in caplog.text
    (root / "latest").unlink()                              # deleted pointer
    assert latest_checkpoint(root) == s3
    data = (s3 / "state.pt").read_bytes()
    (s3 / "state.pt").write_bytes(data[: len(data) // 2])    # truncated newest state.pt
    (root / "latest").write_text("step_000003\n")
    assert latest_checkpoint(root) == s2
    state, meta = load_checkpoint(root)
    assert state["step"] == 2 and meta["path"] == str(s2)
    with pytest.raises(BatonError, match=r"step_000003/state.pt: refused"):   # named explicitly: refused
        load_checkpoint(s3)
    for d in (s1, s2):
        (d / "state.pt").write_bytes(b"not a zip")
    with pytest.raises(BatonError, match="no intact checkpoint"):
        latest_checkpoint(root)
    assert latest_checkpoint(tmp_path / "empty") is None     # nothing there: a fresh start


def test_a_malicious_checkpoint_is_refused_naming_the_file(tmp_path):
    class Boom:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    d = save_checkpoint(tmp_path / "c", 1, {"step": 1})
    with open(d / "state.pt", "wb") as f:
        torch.save({"step": 1, "x": Boom()}, f, pickle_module=pickle)
    with pytest.raises(BatonError, match=r"state.pt: refused") as e:
        load_checkpoint(d)
    assert "weights_only=False" not in str(e.value) and not (tmp_path / "pwned").exists()


def test_pretrain_refuses_a_used_run_dir_and_resumes_past_a_dangling_pointer(tmp_path, synthetic_shards, capsys):
    run = tmp_path / "run"
    cfg = write_tiny_config(tmp_path / "c.yaml", run, synthetic_shards, train={"checkpoint_every": 3,
                                                                              "keep_last": 10, "epochs": 2})
    assert cli_main(["pretrain", str(cfg), "train.stop_after_steps=6"]) == 0
    before = {p.name: (p / "state.pt").read_bytes() for p in (run / "checkpoints").glob("step_*")}
    metrics = (run / "metrics.jsonl").read_text()
    assert cli_main(["pretrain", str(cfg)]) == 2                     # no resume=: refused, nothing touched
    err = capsys.readouterr().err
    assert "resume=latest" in err and "run_dir=" in err
    assert (run / "metrics.jsonl").read_text() == metrics
    (run / "checkpoints" / "latest").write_text("step_000099\n")
    assert cli_main(["pretrain", str(cfg), "resume=latest"]) == 0
    assert "resuming from" in capsys.readouterr().err                 # the warning names the step taken
    state, _ = load_checkpoint(run)
    assert state["step"] == 16                                        # continued from step 6, not from 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == sorted(steps) and len(steps) == len(set(steps))   # no step logged twice: not restarted
    for name, data in before.items():
        assert (run / "checkpoints" / name / "state.pt").read_bytes() == data


def test_pretrain_checkpoint_every_0_means_every_epoch_as_in_finetuning(tmp_path, synthetic_shards):
    run = tmp_path / "run"
    cfg = write_tiny_config(tmp_path / "c.yaml", run, synthetic_shards, train={"checkpoint_every": 0,
                                                                              "keep_last": 0, "epochs": 2})
    assert cli_main(["pretrain", str(cfg)]) == 0
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000008", "step_000016"]


def test_a_non_finite_pretraining_loss_stops_with_the_step_and_keeps_the_checkpoints(tmp_path, synthetic_shards,
                                                                                     capsys):
    run = tmp_path / "run"
    cfg = write_tiny_config(tmp_path / "c.yaml", run, synthetic_shards, train={"checkpoint_every": 2})
    assert cli_main(["pretrain", str(cfg), "train.stop_after_steps=2"]) == 0
    good = (run / "checkpoints" / "step_000002" / "state.pt").read_bytes()
    assert cli_main(["pretrain", str(cfg), "resume=latest", "optim.lr=1e30", "optim.grad_clip=null"]) == 2
    err = capsys.readouterr().err
    assert "not finite at step" in err and "step_000002" in err and "optim.lr" in err
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert ckpts[-1] in ("step_000002", "step_000003")  # at most the one finite step after the resume
    assert (run / "checkpoints" / "step_000002" / "state.pt").read_bytes() == good
    state, _ = load_checkpoint(run)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.parametrize("stage, override", [
    ("finetune", "data.batch_size=0"), ("finetune", "data.batch_size=-4"), ("finetune", "optim.lr=-1"),
    ("finetune", "data.crop_scale_min=1.5"), ("pretrain", "data.batch_size=0"), ("pretrain", "train.grad_accum=0"),
    ("pretrain", "dino.teacher_temp=0"), ("pretrain", "data.workers=-1")])
def test_out_of_range_config_values_are_refused_when_loaded(stage, override):
    from baton.config import load_config
    from finetune.config import FinetuneConfig
    from pretrain.config import PretrainConfig

    schema = FinetuneConfig if stage == "finetune" else PretrainConfig
    key = override.split("=")[0]
    with pytest.raises(BatonError, match=rf"config key {key}=\S+ is out of range: it must be"):
        load_config(schema, None, [override])


def test_a_handoff_without_an_architecture_is_refused(tmp_path):
    import json

    from test_finetune import write_tiny_handoff

    from pretrain.backbones import load_backbone

    h = write_tiny_handoff(tmp_path / "h")
    meta = json.loads((h / "backbone.json").read_text())
    for broken in ({}, {"embed_dim": 32}):  # empty, and an open_clip config missing its towers
        (h / "backbone.json").write_text(json.dumps({**meta, "model_config": broken}))
        with pytest.raises(BatonError, match="model_config"):
            load_backbone(h)


def test_evaluating_a_split_with_no_second_image_of_any_class_is_refused(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "folder"
    for c in ("a", "bb", "ccc", "dddd"):
        (root / c).mkdir(parents=True)
        Image.new("RGB", (16, 16), (10 * len(c), 0, 0)).save(root / c / "0.png")
    assert cli_main(["evaluate", "pixels", "--data-source", "folder", "--data-root", str(root),
                     "--split", "test", "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert "no query has an answer" in err and not (tmp_path / "ev" / "metrics.json").exists()


def test_a_non_finite_finetuning_loss_stops_with_the_step_and_the_last_good_checkpoint(tmp_path, capsys):
    from conftest import make_synthetic_shards
    from test_finetune import overrides, write_tiny_handoff

    make_synthetic_shards(tmp_path / "data" / "train", per_class=4, seed=0)
    make_synthetic_shards(tmp_path / "data" / "test", per_class=3, seed=1)
    handoff = write_tiny_handoff(tmp_path / "handoff")
    args = overrides(tmp_path, handoff, "run", "train.epochs=2", "train.steps_per_epoch=4")
    recipe = str(Path(__file__).resolve().parents[1] / "configs" / "demo_softtriple.yaml")
    assert cli_main(["finetune", recipe, *args, "train.epochs=1"]) == 0
    # an infinite scale is refused when the config loads, before any step
    assert cli_main(["finetune", recipe, *args, "resume=latest", "loss.kwargs.la=.inf"]) == 2
    err = capsys.readouterr().err
    assert "loss.kwargs.la=inf is out of range" in err and "Logging error" not in err
    # a finite one that overflows float32 makes the loss itself non-finite at the first step
    assert cli_main(["finetune", recipe, *args, "resume=latest", "loss.la=1e39"]) == 2
    err = capsys.readouterr().err
    assert "not finite at step" in err and "step_000004" in err and "Logging error" not in err
    state, _ = load_checkpoint(tmp_path / "run")
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_a_fifo_in_a_folder_source_is_skipped_not_waited_on(tmp_path):
    """Opening a FIFO blocks until a writer comes; `baton shards` must skip it and finish."""
    import os
    import subprocess
    import sys

    from PIL import Image

    root = tmp_path / "tree"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / c / f"{i}.png")
    os.mkfifo(root / "cat" / "stuck.png")
    out = tmp_path / "shards"
    done = subprocess.run([sys.executable, "-m", "baton", "shards", "folder", str(root), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["written"] == 4 and stats["skipped"] == {"not_a_file": 1}


def test_shard_workers_exit_when_baton_shards_is_killed(tmp_path):
    """kill -9 of `baton shards --workers 2`: its forkserver's workers notice and exit."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "tree"
    for c in range(4):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(150):
            Image.fromarray(rng.integers(0, 256, (192, 192, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")

    proc = subprocess.Popen([sys.executable, "-m", "baton", "shards", "folder", str(root), "--out",
                             str(tmp_path / "out"), "--workers", "2", "--shard-size", "8"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, workers = time.time() + 60, set()
    while time.time() < deadline and len(workers) < 3 and proc.poll() is None:  # forkserver + 2 workers
        workers = descendant_pids(proc.pid)
        time.sleep(0.1)
    assert proc.poll() is None and len(workers) >= 3, "the job ended before its workers could be seen"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    def running(pid: int) -> bool:  # a zombie has exited: only its parent has not reaped it yet
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False

    deadline = time.time() + 15
    while time.time() < deadline and any(running(w) for w in workers):
        time.sleep(0.2)
    alive = [w for w in workers if running(w)]
    for w in alive:
        os.kill(w, signal.SIGKILL)
    assert not alive, f"{len(alive)} worker processes outlived baton shards"


def test_a_full_disk_during_a_checkpoint_leaves_nothing_behind_and_names_the_last_good_step(tmp_path,
                                                                                          monkeypatch):
    import errno

    from baton import checkpoint as ck

    root = tmp_path / "checkpoints"
    three_steps(root)
    real_save = torch.save

    def save_until_full(obj, f, *a, **kw):  # writes part of the file, then the device is full
        Path(f).write_bytes(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", save_until_full)
    with pytest.raises(BatonError, match=r"step 4 failed: no space left on the device of .*"
                                         r"The last good checkpoint is step_000003"):
        save_checkpoint(root, 4, {"step": 4})
    ck.open_step_dir(root, 5)   # the sharded protocol: the ranks' files are in the temporary directory
    (ck.tmp_step_dir(root, 5) / "shard_0.distcp").write_bytes(b"x" * 1000)
    with pytest.raises(BatonError, match="step 5 failed: no space left"):
        ck.publish_step_dir(root, 5, {"step": 5})
    monkeypatch.setattr(ck.torch, "save", real_save)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000001", "step_000002", "step_000003"]
    assert latest_checkpoint(root).name == "step_000003"


@pytest.fixture
def stalling_server():
    """A TCP server on localhost: /silent accepts and never answers; /stall sends headers and half
    of a tar body, then nothing. Yields its base URL."""
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    conns, stop = [], threading.Event()

    def serve():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            conns.append(conn)
            request = conn.recv(4096).decode("latin-1")
            if "/stall" in request.split("\r\n", 1)[0]:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-tar\r\nContent-Length: 20480\r\n\r\n"
                             + b"\0" * 1024)
            # /silent: never a byte

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    thread.join(2)
    for c in conns:
        c.close()
    srv.close()


@pytest.mark.parametrize("path", ["silent", "stall"])
def test_a_server_that_does_not_answer_times_out_naming_the_url(stalling_server, path, monkeypatch, caplog):
    import time

    from pretrain.data.samples import StreamProgress, shard_files

    monkeypatch.setenv("BATON_IO_TIMEOUT_S", "1.5")
    url = f"{stalling_server}/{path}/shard-000000.tar"
    progress = StreamProgress(where="data.train_shards")
    t0 = time.time()
    members = [m for m in shard_files(iter([(0, url)]), progress, empty_limit=5) if m]
    assert time.time() - t0 < 30 and members == []
    assert progress.rejected["unreadable_shard"] == 1 and url in caplog.text  # skipped, counted, named


CHILD = """
import os, sys, time
from baton.distributed import init_distributed, barrier
from baton.errors import BatonError
info = init_distributed("cpu")
if info.rank == 1:
    time.sleep(60)          # a stopped rank: never reaches the barrier
    sys.exit(0)
try:
    barrier()
except BatonError as e:
    print("BATON", e, flush=True)
    os._exit(3)
"""


def test_a_stuck_rank_makes_the_others_fail_with_an_error_naming_the_rank(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "BATON_COLLECTIVE_TIMEOUT_S": "3"}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    t0 = time.time()
    out, _ = procs[0].communicate(timeout=50)
    procs[1].kill()
    procs[1].wait()
    assert procs[0].returncode == 3 and time.time() - t0 < 45, out
    assert "rank 0 of 2: a barrier failed" in out and "BATON_COLLECTIVE_TIMEOUT_S=3" in out


def test_an_output_path_that_cannot_be_a_directory_is_refused_before_the_work(tmp_path, synthetic_shards, capsys):
    """A file where an output directory goes (or under it): pretrain's run_dir, evaluate's and
    shards' --out, export's OUT each stop with an error naming the flag, before any work, never a
    FileExistsError traceback after it (evaluate's metrics, an export, lost)."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cfg = write_tiny_config(tmp_path / "c.yaml", a_file, synthetic_shards, train={"max_steps": 1})
    jsonl = tmp_path / "ann.jsonl"
    jsonl.write_text("{}\n")
    run = tmp_path / "run"
    for argv, named in ([["pretrain", str(cfg)], "run_dir"],
                        [["evaluate", "pixels", "--data-root", str(synthetic_shards), "--out", str(a_file)], "--out"],
                        [["shards", "odvg", str(jsonl), "--out", str(a_file / "sub")], "--out"]):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert f"{named} {a_file}" in err and "Traceback" not in err
    write_tiny_config(tmp_path / "c2.yaml", run, synthetic_shards, train={"max_steps": 1})
    assert cli_main(["pretrain", str(tmp_path / "c2.yaml")]) == 0
    capsys.readouterr()
    assert cli_main(["export", str(run), str(a_file)]) == 2
    assert f"OUT {a_file} exists and is not a directory" in capsys.readouterr().err
