"""Where released weights are cached, so that a failed download names the place to fill.

Machines without a model hub (HF_HUB_OFFLINE=1, clusters behind a firewall) can still start from
released weights if someone copies them into the cache the library reads first; the error says
which directory and which repository or URL, instead of a library's bare connection error.
"""

from __future__ import annotations

import os
from pathlib import Path


def hf_repo_cache(repo_id: str) -> Path:
    """The Hugging Face hub cache directory of one model repository (what `hf download` fills)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"


def offline() -> bool:
    """True when the hub is switched off (HF_HUB_OFFLINE=1): downloads cannot succeed."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def fill_hint(place: str, repo: str | None = None) -> str:
    """'fill PLACE' for an error message, with how to fill a hub cache from a machine online."""
    how = (f" (`hf download {repo}` on a machine online, then copy that directory here; the hub cache is "
           f"HF_HUB_CACHE, by default HF_HOME/hub, or the older HUGGINGFACE_HUB_CACHE)" if repo
           else " (download it on a machine online, then copy it here)")
    return ("no copy in the local cache" + (" (HF_HUB_OFFLINE=1)" if offline() else "")
            + f"; fill {place}{how}")
