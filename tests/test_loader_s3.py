"""Shards on S3: a real S3-protocol server (moto's standalone server) on loopback, started and
stopped by the test; the loader reads it through fsspec/s3fs like any other URL."""

from __future__ import annotations

import socket
from collections import Counter

import pytest

moto_server = pytest.importorskip("moto.server", reason="moto[server] not installed (pip install -e '.[dev]')")
pytest.importorskip("s3fs", reason="s3fs not installed (pip install -e '.[dev]')")


@pytest.fixture
def s3_shards(tmp_path, monkeypatch):
    """The shards of test_loader's layout (4 x 8 samples + stats.json) in s3://baton-test/shards/."""
    import fsspec

    from test_loader import write_good_shards

    keys = write_good_shards(tmp_path / "local", shards=4, per_shard=8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_SESSION_TOKEN": "test",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
            monkeypatch.setenv(k, v)
        fsspec.filesystem("s3").clear_instance_cache()
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("baton-test")
        fs.put(str(tmp_path / "local") + "/", "baton-test/shards/", recursive=True)
        fs.clear_instance_cache()
        yield "s3://baton-test/shards/", keys
    finally:
        server.stop()


@pytest.mark.slow
def test_reads_shards_from_s3(s3_shards, capsys):
    from baton.errors import BatonError
    from pretrain.data import resolve_sources
    from test_loader import data_cfg, epoch_keys

    url, keys = s3_shards
    dcfg = data_cfg(url, mode="epoch_exact", workers=2)
    sources = resolve_sources(dcfg.train_shards)
    assert sources.urls == [f"{url}shard-{i:06d}.tar" for i in range(4)] and sources.num_samples == 32
    got = Counter(k for batch in epoch_keys(sources, dcfg, steps=8) for k in batch)
    assert sorted(got) == sorted(keys) and set(got.values()) == {1}   # every sample once, in 2 workers

    with pytest.raises(BatonError, match=r"shard not found: s3://baton-test/shards/shard-000004.tar \(and 5 more\)"):
        resolve_sources(f"{url}shard-{{000000..000009}}.tar")
