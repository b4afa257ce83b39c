"""`baton pretrain` reads img2dataset's output unchanged: its tars of KEY.jpg/.txt/.json, and the
sample count from its per-shard `NNNNN_stats.json` (`successes`) where baton's stats.json is absent."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from baton.checkpoint import load_checkpoint
from baton.cli import main as cli_main
from pretrain.data import resolve_sources


def write_img2dataset_output(out: Path, per_shard: tuple[int, ...] = (12, 9), size: int = 32,
                             parquet: bool = True) -> int:
    """The layout img2dataset writes with output_format=webdataset: 00000.tar (keys SSSSSIIII with
    .jpg, .txt, .json), 00000_stats.json, 00000.parquet; failed downloads leave a stats entry
    (`count` > `successes`) but no sample. Returns the number of samples written."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for shard, successes in enumerate(per_shard):
        rows = []
        with wds.TarWriter(str(out / f"{shard:05d}.tar")) as w:
            for i in range(successes):
                key = f"{shard:05d}{i:04d}"
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
                meta = {"url": f"http://example.com/{key}.jpg", "key": key, "status": "success",
                        "caption": f"photo {key}", "width": size, "height": size}
                w.write({"__key__": key, "jpg": buf.getvalue(), "txt": meta["caption"], "json": json.dumps(meta)})
                rows.append(meta)
        stats = {"count": successes + 3, "successes": successes, "failed_to_download": 3, "failed_to_resize": 0,
                 "duration": 1.5, "start_time": 0.0, "end_time": 1.5, "status_dict": {"success": successes}}
        (out / f"{shard:05d}_stats.json").write_text(json.dumps(stats))
        if parquet:
            pq.write_table(pa.Table.from_pylist(rows), out / f"{shard:05d}.parquet")
    return sum(per_shard)


def test_sample_count_comes_from_img2dataset_stats(tmp_path):
    total = write_img2dataset_output(tmp_path / "laion")
    sources = resolve_sources(str(tmp_path / "laion"))
    assert sources.num_samples == total == 21
    assert sorted(c for c in sources.sources[0].counts.values()) == [9, 12]
    # a brace pattern over the same shards reads the same stats; a shard without one: count unknown
    assert resolve_sources(str(tmp_path / "laion" / "{00000..00001}.tar")).num_samples == 21
    (tmp_path / "laion" / "00001_stats.json").unlink()
    assert resolve_sources(str(tmp_path / "laion")).num_samples is None


def test_baton_stats_json_wins_over_img2dataset_stats(tmp_path):
    write_img2dataset_output(tmp_path / "d", parquet=False)
    (tmp_path / "d" / "stats.json").write_text(json.dumps({"num_samples": 5, "shards": [
        {"name": "00000.tar", "count": 3}, {"name": "00001.tar", "count": 2}]}))
    assert resolve_sources(str(tmp_path / "d")).num_samples == 5


@pytest.mark.slow
def test_pretrain_trains_on_img2dataset_output_without_num_samples(tmp_path):
    from test_pretrain import write_tiny_config

    total = write_img2dataset_output(tmp_path / "laion", per_shard=(16, 16))
    cfg = write_tiny_config(tmp_path / "c.yaml", tmp_path / "run", tmp_path / "laion")  # no data.num_samples
    assert cli_main(["pretrain", str(cfg)]) == 0
    state, _ = load_checkpoint(tmp_path / "run")
    assert state["step"] == total // 8  # one epoch of 32 samples in batches of 8
