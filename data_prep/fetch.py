"""Reading an input image's bytes: local paths directly, http(s) URLs through fsspec.

A URL gets a total timeout per attempt and at most `retries` further attempts with exponential
backoff (`backoff * 2**attempt` seconds) for the failures that can pass (timeouts, dropped
connections, 5xx, 429). Every failure ends as `SkipSample(reason)`, counted in stats.json and
never fatal: `http_404`, `http_<status>`, `timeout`, `connection_error`, `incomplete_response`.
"""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass

import fsspec

from data_prep.images import SkipSample, read_bytes

URL_SCHEMES = ("http://", "https://")


@dataclass(frozen=True)
class FetchOptions:
    timeout: float = 10.0  # seconds per attempt (whole response)
    retries: int = 2  # further attempts after the first, for failures that can pass
    backoff: float = 0.5  # seconds before the first retry; doubled each time


def is_url(text: str) -> bool:
    return text.lower().startswith(URL_SCHEMES)


@functools.lru_cache(maxsize=4)
def _http(timeout: float) -> fsspec.AbstractFileSystem:
    """One fsspec http filesystem per process and timeout (it owns an aiohttp session)."""
    import aiohttp

    return fsspec.filesystem("http", skip_instance_cache=True,
                             client_kwargs={"timeout": aiohttp.ClientTimeout(total=timeout)})


def _classify(e: BaseException) -> tuple[str, bool]:
    """(reason, worth retrying) for an exception raised while fetching a URL."""
    import aiohttp

    if isinstance(e, FileNotFoundError):
        return "http_404", False
    if isinstance(e, (TimeoutError, asyncio.TimeoutError)):
        return "timeout", True
    if isinstance(e, aiohttp.ClientResponseError):
        return f"http_{e.status}", e.status >= 500 or e.status == 429
    if isinstance(e, aiohttp.ClientPayloadError):
        return "incomplete_response", True
    if isinstance(e, (aiohttp.ClientError, ConnectionError, OSError)):
        return "connection_error", True
    return "fetch_error", False


def fetch_url(url: str, opts: FetchOptions = FetchOptions()) -> bytes:
    """The body of `url`, or SkipSample naming why not (after bounded retries)."""
    fs = _http(opts.timeout)
    for attempt in range(opts.retries + 1):
        try:
            return fs.cat_file(url)
        except Exception as e:  # aiohttp and fsspec raise many types; all end as a counted skip
            reason, retry = _classify(e)
            if not retry or attempt == opts.retries:
                raise SkipSample(reason, f"{url}: {type(e).__name__}: {e}") from None
        time.sleep(opts.backoff * 2 ** attempt)
    raise AssertionError("unreachable")


def read_source(where: str, opts: FetchOptions = FetchOptions()) -> bytes:
    """Bytes of a local path or an http(s) URL."""
    return fetch_url(where, opts) if is_url(where) else read_bytes(where)
