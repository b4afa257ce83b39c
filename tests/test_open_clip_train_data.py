"""open_clip_train reads `baton shards` output as it is: its webdataset loader
(`open_clip_train.data.get_wds_dataset`, what `--dataset-type webdataset` runs) takes the sample
count from the `sizes.json` baton writes beside `stats.json`, so no `--train-num-samples` is needed,
and one epoch yields every written sample once."""

from __future__ import annotations

import argparse
import functools
import io
import json

import pytest
from PIL import Image

pytest.importorskip("pandas", reason="open_clip_train.data imports pandas (in the dev and bench extras: "
                                      "pip install -e '.[dev]')")


def shards_with_a_skip(out):
    """10 samples in shards of 4 (4, 4, 2) and an input the source skipped, by baton's shard job."""
    from data_prep.job import write_shards
    from data_prep.writer import Sample, Skip

    def png(i):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (20 * i, 255 - 20 * i, 7)).save(buf, format="PNG")
        return buf.getvalue()

    records = [Sample(key=f"k{i:02d}", image=png(i), ext="png", caption=f"caption {i}") for i in range(10)]
    records.append(Skip("odd", "an input the source skipped"))
    return write_shards(records, out, shard_size=4, timing=False)


def loader_args(pattern: str) -> argparse.Namespace:
    """open_clip_train's training arguments that get_wds_dataset reads; no --train-num-samples."""
    return argparse.Namespace(train_data=pattern, val_data=None, train_num_samples=None, dataset_resampled=False,
                              train_data_upsampling_factors=None, seed=0, batch_size=2, world_size=1, workers=0)


def test_open_clip_train_reads_baton_shards_without_train_num_samples(tmp_path, monkeypatch):
    import open_clip_train.data as oc_data
    from torchvision.transforms import functional as TF
    from webdataset.tariterators import tar_file_expander

    # open_clip_train 3.3's grouping cannot take webdataset >= 0.2.96's end-of-shard marker (KeyError
    # 'fname', mlfoundations/open_clip#935): the fix given there, as benchmarks/pretrain_vs_open_clip.py
    monkeypatch.setattr(oc_data, "tar_file_expander", functools.partial(tar_file_expander, eof_value=None))
    out = tmp_path / "shards"
    stats = shards_with_a_skip(out)
    assert stats["num_samples"] == 10 and stats["skipped"] == {"odd": 1}
    names = [s["name"] for s in stats["shards"]]
    pattern = f"{out}/{{{','.join(n.removesuffix('.tar') for n in names)}}}.tar"
    assert oc_data.get_dataset_size(pattern) == (10, len(names))

    data = oc_data.get_wds_dataset(loader_args(pattern), TF.to_tensor, is_train=True, tokenizer=lambda t: [t])
    assert data.dataloader.num_samples == 10 and data.dataloader.num_batches == 5
    captions, shapes = [], set()
    for images, texts in data.dataloader:
        captions += list(texts)
        shapes.add(tuple(images.shape))
    assert sorted(captions) == sorted(f"caption {i}" for i in range(10))   # each written sample once
    assert shapes == {(2, 3, 8, 8)}

    (out / "sizes.json").unlink()   # what baton wrote before: open_clip_train then needs the flag
    with pytest.raises(RuntimeError, match="--train-num-samples"):
        oc_data.get_wds_dataset(loader_args(pattern), TF.to_tensor, is_train=True, tokenizer=lambda t: [t])
    assert json.loads((out / "stats.json").read_text())["num_samples"] == 10
