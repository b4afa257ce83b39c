"""Typed configs: dataclasses filled from YAML files and `key=value` overrides (OmegaConf).

Each stage declares its config as a dataclass; `load_config` merges, in order, the dataclass
defaults, the YAML file and the command-line overrides, and checks keys and types against the
dataclass. Unknown keys and wrong types raise a `BatonError` that names the key and the valid
choices. A numeric field declared with `bounded(default, ge=, gt=, le=)` has its range checked in
the same place, so a `data.batch_size=0` is refused when the config is loaded, not by a
ZeroDivisionError deep inside a stage.

A YAML recipe may start from another one: `base: demo_softtriple.yaml` (a path relative to the
recipe's own folder) merges that file first and this one on top, so a variant states only what
it changes (dinov2's and mmcv's config inheritance, one level of syntax: a file, not a list).

A schema may declare two class attributes: `RENAMED_KEYS` ({old dotted key: new dotted key}), so
recipes and command lines written before a key moved keep working (the value is read as the new
key, with a warning), and a `validate()` method, run on the loaded config, for checks a field's
type cannot express (a loss's arguments against its constructor). A `Dict[str, Any]` field is an
open section (any key), and an override `key={...}` replaces such a section instead of merging
into it, so `loss.kwargs={}` clears arguments a recipe set for another loss.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from pathlib import Path
from typing import Any, Sequence, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from baton.compat import config_child, is_free_mapping
from baton.errors import BatonError

T = TypeVar("T")


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None) -> Any:
    """A dataclass field whose numeric value `load_config` checks: >= ge, > gt, <= le (None: no bound;
    a None value, where the field allows it, is not checked)."""
    return dataclasses.field(default=default, metadata={"ge": ge, "gt": gt, "le": le})


def check_ranges(cfg: Any, prefix: str = "") -> None:
    """Every `bounded` field of `cfg` and of its nested dataclasses is in its range, or a BatonError
    names the key, its value and the range."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_ranges(value, key + ".")
            continue
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        ge, gt, le = (f.metadata.get(k) for k in ("ge", "gt", "le"))
        bad = (ge is not None and not value >= ge) or (gt is not None and not value > gt) or \
              (le is not None and not value <= le)
        if bad:
            need = " and ".join(f"{op} {b}" for op, b in ((">=", ge), (">", gt), ("<=", le)) if b is not None)
            raise BatonError(f"config key {key}={value} is out of range: it must be {need}")


def _valid_keys(schema: Any, dotted: str) -> list[str]:
    """The keys allowed at the level of `dotted` (a.b.c) in the schema."""
    node = OmegaConf.structured(schema)
    parts = dotted.split(".")[:-1]
    for p in parts:
        try:
            node = node[p]
        except Exception:
            return []
    try:
        return sorted(node.keys())
    except Exception:
        return []


def explain_config_error(schema: Any, err: OmegaConfBaseException, source: str) -> BatonError:
    """An OmegaConf merge/validation error as a BatonError naming the source, the key and the valid keys."""
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, ConfigKeyError) or "Key '" in str(err) and "not in struct" in str(err):
        choices = _valid_keys(schema, key) if key else []
        leaf = key.split(".")[-1]
        hint = difflib.get_close_matches(leaf, choices, n=1)
        msg = f"{source}: unknown config key '{key}'."
        if hint:
            msg += f" Did you mean '{hint[0]}'?"
        if choices:
            msg += f" Valid keys here: {', '.join(choices)}."
        return BatonError(msg)
    if isinstance(err, ValidationError):
        return BatonError(f"{source}: bad value for config key '{key}': {err.msg}")
    return BatonError(f"{source}: {err}")


def read_yaml(path: str | Path, what: str = "a YAML file, e.g. configs/demo_clip.yaml") -> Any:
    """The OmegaConf node of a YAML file, or a BatonError naming the file (missing, or bad syntax)."""
    path = Path(path)
    if not path.is_file():
        raise BatonError(f"config file not found: {path} (pass {what})")
    try:
        return OmegaConf.load(path)
    except Exception as e:  # YAML syntax
        raise BatonError(f"{path}: cannot parse YAML: {e}") from None


BASE_KEY = "base"


def read_recipe(path: str | Path, what: str = "a YAML file, e.g. configs/demo_clip.yaml") -> Any:
    """The YAML file's node with its `base:` chain merged in (bases first), the `base` key removed."""
    chain: list[Path] = []     # this file, its base, the base's base, ...
    nodes: list[Any] = []      # their YAML, bases first
    path = Path(path)
    while True:
        if path.resolve() in chain:
            raise BatonError(f"{path}: `{BASE_KEY}:` loops back to a file already in the chain "
                             f"({' -> '.join(str(p) for p in [*chain, path.resolve()])})")
        node = read_yaml(path, f"the `{BASE_KEY}:` of {chain[-1]}" if chain else what)
        chain.append(path.resolve())
        nodes.insert(0, node)
        base = node.get(BASE_KEY) if OmegaConf.is_dict(node) else None
        if base is None:
            break
        if not isinstance(base, str) or not base:
            raise BatonError(f"{path}: `{BASE_KEY}:` must be the path of one YAML file, not {base!r}")
        path = path.parent / base
    for node in nodes:
        if OmegaConf.is_dict(node):
            node.pop(BASE_KEY, None)
    return OmegaConf.merge(*nodes) if len(nodes) > 1 else nodes[0]


def _open_dict_sections(node: DictConfig) -> None:
    """Lift struct mode off the `Dict[str, Any]` fields (their keys are free: a loss's arguments);
    the dataclass sections around them stay closed, so a misspelt key there is still refused."""
    for key in node:
        child = config_child(node, key)
        if isinstance(child, DictConfig):
            if is_free_mapping(child):
                OmegaConf.set_struct(child, False)
            else:
                _open_dict_sections(child)


_MISSING = object()


def rename_keys(node: Any, renamed: dict[str, str], source: str, warn: bool = True) -> None:
    """Move each old key of `renamed` present in `node` to its new key (in place), with a warning;
    a node that sets both spellings is refused, as neither can win silently."""
    if not OmegaConf.is_dict(node):
        return
    for old, new in renamed.items():
        value = OmegaConf.select(node, old, default=_MISSING)
        if value is _MISSING:
            continue
        if OmegaConf.select(node, new, default=_MISSING) is not _MISSING:
            raise BatonError(f"{source}: sets both '{old}' and '{new}'; '{old}' is the old spelling of "
                             f"'{new}': keep only '{new}'")
        parent, _, leaf = old.rpartition(".")
        (OmegaConf.select(node, parent) if parent else node).pop(leaf)
        OmegaConf.update(node, new, value, force_add=True)
        if warn:
            logging.getLogger("baton").warning("%s: config key '%s' is now spelled '%s' (read as that)",
                                               source, old, new)


def load_config(schema: type[T], path: str | Path | None = None,
                overrides: Sequence[str] = ()) -> T:
    """Build a `schema` instance from defaults, an optional YAML file and `key=value` overrides."""
    base = OmegaConf.structured(schema)
    OmegaConf.set_struct(base, True)
    _open_dict_sections(base)
    renamed: dict[str, str] = getattr(schema, "RENAMED_KEYS", {})
    merged = base
    if path is not None:
        path = Path(path)
        file_cfg = read_recipe(path)
        rename_keys(file_cfg, renamed, str(path))
        try:
            merged = OmegaConf.merge(merged, file_cfg)
        except OmegaConfBaseException as e:
            raise explain_config_error(schema, e, str(path)) from None
    for item in overrides:
        if "=" not in item:
            raise BatonError(f"override '{item}' is not of the form key=value")
        key, _, value = item.partition("=")
        if key in renamed:
            logging.getLogger("baton").warning("override '%s': config key '%s' is now spelled '%s' "
                                               "(read as that)", item, key, renamed[key])
            key = renamed[key]
            item = f"{key}={value}"
        try:
            parsed = OmegaConf.from_dotlist([item])
            section = OmegaConf.select(merged, key, default=None)
            if isinstance(section, DictConfig) and OmegaConf.is_dict(OmegaConf.select(parsed, key)) \
                    and is_free_mapping(section):
                OmegaConf.update(merged, key, OmegaConf.select(parsed, key), merge=False)  # key={...}: replace
                OmegaConf.set_struct(OmegaConf.select(merged, key), False)  # still an open section
            else:
                merged = OmegaConf.merge(merged, parsed)
        except OmegaConfBaseException as e:
            raise explain_config_error(schema, e, f"override '{item}'") from None
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise explain_config_error(schema, e, str(path or "config")) from None
    check_ranges(cfg)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg  # type: ignore[return-value]


def to_yaml(cfg: Any) -> str:
    """The fully resolved config as YAML (written to each run directory)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml(schema: type[T], text: str) -> T:
    merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(text))
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


# Keys whose change between an interrupted run and its resumption does not alter the trajectory.
RESUME_NEUTRAL_KEYS = ("resume", "train.stop_after_steps", "train.log_every", "train.checkpoint_every",
                       "train.keep_last", "train.keep_checkpoints", "train.tensorboard", "train.eval_at_end")


def config_changes(old_yaml: str, cfg: Any, ignore: Sequence[str] = RESUME_NEUTRAL_KEYS) -> list[str]:
    """The keys (dotted, with 'old -> new') on which `cfg` differs from a run's saved config.yaml.

    Used when a run is resumed: continuing with another learning rate or length is allowed (users
    extend runs) but must not go unnoticed, since the result then differs from any single run.
    """
    def flat(node: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(node, dict):
            out: dict[str, Any] = {}
            for k, v in node.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: node}

    saved = OmegaConf.create(old_yaml)
    rename_keys(saved, getattr(type(cfg), "RENAMED_KEYS", {}), "saved config", warn=False)
    old = flat(OmegaConf.to_container(saved))
    new = flat(OmegaConf.to_container(OmegaConf.structured(cfg)))
    # Keys the saved config lacks are schema additions since that run, not the user's changes.
    return [f"{k}: {old[k]!r} -> {new.get(k)!r}" for k in sorted(old)
            if k not in ignore and old[k] != new.get(k)]
