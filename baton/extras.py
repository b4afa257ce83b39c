"""Optional dependencies, each installed through one of the package's extras (pyproject.toml).

A missing one is a `BatonError` naming what needed it and the `pip install 'baton[EXTRA]'` that
brings it, instead of a bare ImportError from deep inside a library (fsspec's "Install s3fs to
access S3", or `No module named 'faiss'` in the middle of an evaluation).
"""

from __future__ import annotations

import importlib
from types import ModuleType

# module -> (the extras that install it, what it is for)
EXTRAS = {
    "faiss": (("faiss-cpu", "faiss-gpu"), "the retrieval metrics (nearest neighbours, k-means)"),
    "s3fs": (("s3",), "s3:// URLs"),
}


def install_hint(module: str) -> str:
    extras, what = EXTRAS[module]
    options = " or ".join(f"pip install 'baton[{e}]'" for e in extras)
    one_of = " (one of them: both write the same package)" if len(extras) > 1 else ""
    return f"{module} is not installed; {what} need it: {options}{one_of}"


def require(module: str, needed_by: str) -> ModuleType:
    """Import `module` (a key of EXTRAS), or raise a BatonError naming `needed_by` and its extra."""
    from baton.errors import BatonError

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise BatonError(f"{needed_by}: {install_hint(module)} ({e})") from None
