"""The loader under two ranks (gloo on CPU), in one torchrun launch (imports cost seconds per process):

1. epoch-exact mode with more readers (2 x 5) than shards (8) stops before training with the numbers and the
   fix, on both ranks (no hang);
2. `baton pretrain` over good + corrupt shards, 2 ranks x 2 workers, in both modes (epoch-exact
   and resampled): interrupted mid-epoch and resumed, each rank sees exactly the sample keys of the uninterrupted
   run, ends with the same weights, and the checkpoint's skip counts (summed over ranks) match.

Pytest runs `test_two_ranks`; torchrun runs this file as a script (`_worker`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_ranks(tmp_path, synthetic_shards):
    from test_loader import write_corrupt_shards

    write_corrupt_shards(tmp_path / "bad", size=32)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"
           f"{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, str(tmp_path), str(synthetic_shards), str(tmp_path / "bad")]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"result{rank}.json").read_text())
        assert "2 ranks x 5 workers = 10 readers" in result["error"] and "8 shards" in result["error"]
        for mode in ("epoch_exact", "resampled"):
            r = result[mode]
            assert sorted(map(int, r["full"])) == list(range(1, 11)), mode
            assert r["resumed_from"] == 4 and r["joined"] == r["full"], (rank, mode)
            assert r["same_weights"], mode
            assert r["skipped"][0] == r["skipped"][1] and sum(r["skipped"][0].values()) > 0, r["skipped"]
    r0, r1 = (json.loads((tmp_path / f"result{k}.json").read_text())["epoch_exact"]["full"] for k in (0, 1))
    keys0 = {k for step, keys in r0.items() if int(step) <= 5 for k in keys}   # epoch 0: steps 1-5
    keys1 = {k for step, keys in r1.items() if int(step) <= 5 for k in keys}
    assert keys0 and keys1 and not keys0 & keys1   # epoch-exact: the ranks read different shards


def _worker(out: Path, good: str, bad: str) -> None:
    import pretrain.train
    from baton.errors import BatonError
    from test_loader import resume_check, train_keys
    from test_pretrain import write_tiny_config

    rank = os.environ["RANK"]
    destroy = pretrain.train.destroy
    pretrain.train.destroy = lambda: None   # several runs in one process group
    cfg = write_tiny_config(out / f"c{rank}.yaml", out / "unused", "",
                            data={"train_shards": [good, {"url": bad, "weight": 1.0}], "workers": 2,
                                  "num_samples": 80}, train={"epochs": 2})  # 5 steps/epoch x 2 ranks x 8
    result = {}
    try:
        train_keys(cfg, f"run_dir={out / 'error'}", "data.mode=epoch_exact", "data.workers=5")
        result["error"] = "no error"
    except BatonError as e:
        result["error"] = str(e)
    for mode in ("epoch_exact", "resampled"):
        r = resume_check(out / mode, cfg, 4, 3, f"data.mode={mode}")
        result[mode] = {**r, "full": {str(k): v for k, v in r["full"].items()},
                        "joined": {str(k): v for k, v in r["joined"].items()}}
    (out / f"result{rank}.json").write_text(json.dumps(result))
    destroy()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
