"""Reading shards and their listings over the network with a timeout, so a server that accepts a
connection and never answers, or stalls in the middle of a body, ends in an error naming the URL
instead of a silent wait (fsspec's http default is a 300 s total limit per request and none
between the bytes of a body; s3fs's botocore waits 60 s per read and retries 4 times).

The limit is `BATON_IO_TIMEOUT_S` seconds (default 60) for connecting and between two reads of the
same response; it reaches every loader worker through the environment. A shard that times out is
skipped and counted (`unreadable_shard`) by the loader like any other unreadable shard.
"""

from __future__ import annotations

from typing import Any

import fsspec

from baton.extras import require
from baton.io import seconds_from_env

TIMEOUT_ENV = "BATON_IO_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 60.0


def io_timeout_s() -> float:
    return seconds_from_env(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options giving `url`'s filesystem the timeouts above (none needed for local files)."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else "file"
    t = io_timeout_s()
    if scheme in ("http", "https"):
        import aiohttp

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, connect=t, sock_connect=t,
                                                                   sock_read=t)}}
    if scheme in ("s3", "s3a"):
        require("s3fs", f"reading {url}")  # fsspec's S3 filesystem; else its ImportError mid-listing
        return {"config_kwargs": {"connect_timeout": t, "read_timeout": t,
                                  "retries": {"max_attempts": 3, "mode": "standard"}}}
    return {}


def open_url(url: str, mode: str = "rb"):
    """`fsspec.open` with the timeouts of `storage_options`."""
    return fsspec.open(url, mode, **storage_options(url))


def url_to_fs(url: str):
    """`fsspec.core.url_to_fs` with the timeouts of `storage_options`."""
    return fsspec.core.url_to_fs(url, **storage_options(url))
