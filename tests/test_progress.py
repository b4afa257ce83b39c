"""Progress bars show on a terminal and stay out of non-TTY logs (Slurm files, pipes)."""

from __future__ import annotations

import io
import logging
import sys

import numpy as np
import torch
from PIL import Image

from baton.progress import logs_above_bar, progress_bar
from finetune.model import embed_images


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def embed_five(desc: str):
    images = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(5)]
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    return embed_images(model, to_tensor, images, batch_size=2, desc=desc)


def to_tensor(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)


def test_embedding_bar_on_a_terminal_only(monkeypatch, capsys):
    assert embed_five("embed test").shape == (5, 4)
    assert "embed test" not in capsys.readouterr().err  # pytest's stderr is not a TTY: no bar
    tty = Terminal()
    monkeypatch.setattr(sys, "stderr", tty)
    embed_five("embed test")
    assert "embed test" in tty.getvalue() and "5/5" in tty.getvalue()
    before = len(tty.getvalue())
    embed_five("")  # no name: no bar (callers inside a loop that has its own)
    assert len(tty.getvalue()) == before


def test_training_bar_on_rank_zero_only_and_logs_above_it(monkeypatch):
    tty = Terminal()
    monkeypatch.setattr(sys, "stderr", tty)
    hidden = progress_bar(3, "finetune", enabled=False)
    hidden.update(3)
    hidden.close()
    assert "finetune" not in tty.getvalue()
    log = logging.getLogger("baton.test_progress")
    log.addHandler(logging.StreamHandler(tty))
    bar = progress_bar(4, "finetune", initial=1)
    with logs_above_bar(log):
        bar.update(3)
        log.warning("a line above the bar")
    bar.close()
    out = tty.getvalue()
    assert "finetune" in out and "4/4" in out and "a line above the bar" in out


def test_shards_bar_counts_the_inputs_on_a_terminal_only(monkeypatch, tmp_path, capsys):
    from data_prep.job import JobLayout, run_job, write_shards
    from data_prep.writer import Sample

    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    samples = [Sample(key=f"k{i}", image=png.getvalue(), ext="png", caption=f"c{i}") for i in range(7)]
    write_shards(samples, tmp_path / "a", shard_size=3)
    assert "shards" not in capsys.readouterr().err  # not a TTY: no bar
    tty = Terminal()
    monkeypatch.setattr(sys, "stderr", tty)
    assert write_shards(samples, tmp_path / "b", shard_size=3)["num_samples"] == 7
    assert "shards: 7sample" in tty.getvalue()   # 3 chunks (3 + 3 + 1), no total: the plan streams
    tty.seek(0)
    tty.truncate()
    write_shards(samples, tmp_path / "b", shard_size=3)  # a rerun finds every chunk done: counted too
    assert "shards: 7sample" in tty.getvalue()
    tty.seek(0)
    tty.truncate()
    run_job(lambda: samples, tmp_path / "c", layout=JobLayout(shard_size=3, part=(1, 2)))
    assert "shards, part 1/2: 3sample" in tty.getvalue()   # chunk 1 only: this part's inputs
