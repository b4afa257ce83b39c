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

A schema may declare, so that recipes, command lines and checkpoints written before a key moved
keep working (each read the new way, with a warning naming the new spelling):
- `RENAMED_KEYS` ({old dotted key: new dotted key}); a key may name a whole section, and then its
  sub-keys on the command line move with it (`model.name=...` -> `clip.name=...`);
- `DROPPED_KEYS` ({old dotted key: why it is no longer read}): removed, with the reason;
- `RENAMED_VALUES` ({dotted key: {old value: new value}}): an old way of spelling a value
  (`optim.grad_clip: 0` for "off", now `null`);
- `CHOSEN_SECTION` (a `ChosenSection`): one key names a choice (`method: dino`) and the section of
  the same name (`dino:`) is typed by that choice's own dataclass, looked up in its registry; the
  loaded config is an instance of `concrete_schema(schema, choice)`, a subclass with that field;
- a `validate()` method, run on the loaded config, for checks a field's type cannot express (a
  loss's arguments against its constructor). A `Dict[str, Any]` field is an
open section (any key), and an override `key={...}` replaces such a section instead of merging
into it, so `loss.kwargs={}` clears arguments a recipe set for another loss.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import functools
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from baton.compat import config_child, is_free_mapping
from baton.config_upgrade import upgrade_node, upgrade_override
from baton.errors import BatonError
from baton.registry import unknown_name

T = TypeVar("T")


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None) -> Any:
    """A dataclass field whose numeric value `load_config` checks: >= ge, > gt, <= le, < lt (None: no
    bound; a None value, where the field allows it, is not checked)."""
    return dataclasses.field(default=default, metadata={"ge": ge, "gt": gt, "le": le, "lt": lt})


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
        ge, gt, le, lt = (f.metadata.get(k) for k in ("ge", "gt", "le", "lt"))
        if any(b is not None for b in (ge, gt, le, lt)) and not math.isfinite(value):
            raise BatonError(f"config key {key}={value} is out of range: it must be a finite number")
        bad = (ge is not None and not value >= ge) or (gt is not None and not value > gt) or \
              (le is not None and not value <= le) or (lt is not None and not value < lt)
        if bad:
            need = " and ".join(f"{op} {b}" for op, b in ((">=", ge), (">", gt), ("<=", le), ("<", lt))
                                if b is not None)
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
        if not OmegaConf.is_dict(node):
            raise BatonError(f"{path}: a recipe is a YAML mapping of keys (run_dir: ..., data: {{...}}), "
                             f"not a {'list' if OmegaConf.is_list(node) else type(node).__name__}")
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


@dataclasses.dataclass(frozen=True)
class ChosenSection:
    """A config key naming a choice whose own section has the choice's name and dataclass, e.g.
    `method: dino` + `dino: {...}` (`DinoConfig`): each choice owns its keys, and adding one touches
    its registry only, not the engine's schema."""
    key: str                                  # the top-level key naming the choice: "method"
    sections: Callable[[], Mapping[str, type]]  # {choice: its section's dataclass}, read when needed
    # Top-level sections of the layout before the choice owned them: {old section: the choice it
    # belonged to}. With that choice it is read as the choice's section; with another, left out
    # (it was not read then either). Both with a warning naming the new key.
    old_sections: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # Keys of the shared schema that the choices took over (`eval`, `data.caption`): each choice's
    # section dataclass says which of them it reads now and where, in its ClassVar
    # `FROM_SHARED_KEYS` ({old dotted key: new dotted key}), read as that with a warning; what is
    # left of these keys is not read by the chosen one and is left out with a warning.
    moved_keys: Sequence[str] = ()


def _choice_default(schema: Any, key: str) -> Any:
    return {f.name: f.default for f in dataclasses.fields(schema)}.get(key)


def chosen_name(schema: Any, node: Any, overrides: Sequence[str]) -> str | None:
    """The choice a recipe node plus overrides make (the last `key=` override wins), or None when
    `schema` has no CHOSEN_SECTION."""
    chosen: ChosenSection | None = getattr(schema, "CHOSEN_SECTION", None)
    if chosen is None:
        return None
    value = _choice_default(schema, chosen.key)
    if OmegaConf.is_dict(node) and chosen.key in node:
        value = node[chosen.key]
    for item in overrides:
        key, _, _ = item.partition("=")
        if key == chosen.key:
            value = OmegaConf.from_dotlist([item])[chosen.key]
    return value


def schema_for_node(schema: Any, node: Any, overrides: Sequence[str]) -> Any:
    """The schema a config with this recipe node and overrides is an instance of: `schema` itself,
    or its concrete subclass for the choice they make (see `ChosenSection`)."""
    name = chosen_name(schema, node, overrides)
    if name is None:
        return schema
    if not isinstance(name, str):
        raise BatonError(f"config key `{schema.CHOSEN_SECTION.key}` must be a name, not {name!r}")
    return concrete_schema(schema, name)


@functools.lru_cache(maxsize=None)
def concrete_schema(schema: Any, name: str) -> Any:
    """`schema` with the field NAME typed by the choice's section dataclass (and the renames that
    read its old layout), or a BatonError listing the known choices."""
    chosen: ChosenSection = schema.CHOSEN_SECTION
    sections = chosen.sections()
    if name not in sections:
        raise unknown_name(chosen.key, name, sections)
    if name in {f.name for f in dataclasses.fields(schema)}:
        raise BatonError(f"{chosen.key} '{name}' is also a config key of {schema.__name__}: rename the {chosen.key}")
    section = sections[name]
    renamed = dict(getattr(schema, "RENAMED_KEYS", {}))
    dropped = dict(getattr(schema, "DROPPED_KEYS", {}))
    unread: dict[str, type] = {}   # old sections of other choices: checked, then left out
    for old, owner in chosen.old_sections.items():
        if owner == name and old != name:
            renamed[old] = name
        elif owner != name:
            dropped[old] = f"it is the section of {chosen.key}={owner} (now spelled '{owner}:'), not read by {name}"
            unread[old] = sections[owner]
    renamed.update(getattr(section, "FROM_SHARED_KEYS", {}))
    for old in chosen.moved_keys:
        readers = [owner for owner, s in sections.items() if owner != name and
                   any(k == old or k.startswith(old + ".") for k in getattr(s, "FROM_SHARED_KEYS", {}))]
        dropped.setdefault(old, f"{chosen.key}={name} does not read it" + (
            f" (only {', '.join(f'{chosen.key}={r}' for r in readers)} did; it is in their own section now)"
            if readers else ""))
    field = dataclasses.field(default_factory=section, metadata={"help": f"used when {chosen.key}={name}"})
    cls = dataclasses.make_dataclass(schema.__name__, [(name, section, field)], bases=(schema,),
                                     namespace={"RENAMED_KEYS": renamed, "DROPPED_KEYS": dropped,
                                                "UNREAD_SECTIONS": unread, "CHOSEN_NAME": name,
                                                "__reduce__": _reduce_concrete})
    cls.__module__ = schema.__module__
    cls.__qualname__ = f"{schema.__qualname__}[{name}]"
    return cls


def concrete_config(schema: Any, name: str, **values: Any) -> Any:
    """An instance of `schema` for the choice `name` (`ChosenSection`), built in code (tests, tools)."""
    return concrete_schema(schema, name)(**{schema.CHOSEN_SECTION.key: name, **values})


def _reduce_concrete(self: Any) -> tuple:
    """Pickle a concrete config by (base schema, choice, fields): its class is made at run time, so
    it cannot be found by name in another process."""
    return (_rebuild_concrete, (type(self).__mro__[1], self.CHOSEN_NAME, dict(self.__dict__)))


def _rebuild_concrete(base: Any, name: str, state: dict) -> Any:
    obj = object.__new__(concrete_schema(base, name))
    obj.__dict__.update(state)
    return obj


def check_unread_sections(schema: Any, node: Any, overrides: Sequence[str], source: str) -> None:
    """The old-layout sections the chosen method does not read (`dino:` in a CLIP config: every
    config used to have one) are still checked against their own dataclass before they are left
    out, as they were when every config held them: a misspelt key or a bad value is refused."""
    for old, section in getattr(schema, "UNREAD_SECTIONS", {}).items():
        nodes = [OmegaConf.create({old: node[old]})] if OmegaConf.is_dict(node) and old in node else []
        nodes += [OmegaConf.from_dotlist([item]) for item in overrides if item.startswith(old + ".")]
        if nodes:
            load_section(section, old, nodes, source)


def load_section(section: type[T], key: str, nodes: Sequence[Any], source: str) -> T:
    """The dataclass `section` filled from config nodes that hold it at the dotted `key` (merged in
    order) and checked as `load_config` checks a schema (unknown keys, types, ranges), each error
    naming the whole key (`loss.kwargs.la`): for a section the schema does not type itself (an
    old-layout section; a choice's arguments in an open mapping, `loss.kwargs` of baton's losses)."""
    holder: Any = section
    for part in reversed(key.split(".")):
        holder = dataclasses.make_dataclass("Section", [(part, holder, dataclasses.field(default_factory=holder))])
    base = OmegaConf.structured(holder)
    OmegaConf.set_struct(base, True)
    try:
        filled = OmegaConf.to_object(OmegaConf.merge(base, *nodes))
    except OmegaConfBaseException as e:
        raise explain_config_error(holder, e, source) from None
    check_ranges(filled)
    for part in key.split("."):
        filled = getattr(filled, part)
    return filled


def check_section_values(schema_node: DictConfig, node: Any, source: str, prefix: str = "") -> None:
    """Every key of the recipe that is a section of the schema (a dataclass: data, train, glip.eval, ...)
    holds a mapping: `glip: 5` is an error naming the key, not OmegaConf's "bad value for config key ''"."""
    if not OmegaConf.is_dict(node):
        return
    for key in node.keys():
        if not isinstance(key, str) or key not in schema_node:
            continue
        child = schema_node._get_node(key)
        if not isinstance(child, DictConfig) or is_free_mapping(child):
            continue
        value = node._get_node(key)
        if OmegaConf.is_dict(value):
            check_section_values(child, value, source, f"{prefix}{key}.")
        elif not (OmegaConf.is_missing(node, key) or value._is_none()):   # null: OmegaConf's own message names it
            raise BatonError(f"{source}: {prefix}{key} is a section (keys {', '.join(sorted(child.keys()))}); "
                             f"give it a mapping of its keys, not {value._value()!r}")


def load_config(schema: type[T], path: str | Path | None = None,
                overrides: Sequence[str] = ()) -> T:
    """Build a `schema` instance from defaults, an optional YAML file and `key=value` overrides."""
    for item in overrides:
        if "=" not in item:
            raise BatonError(f"override '{item}' is not of the form key=value")
    file_cfg = read_recipe(Path(path)) if path is not None else None
    schema = schema_for_node(schema, file_cfg, overrides)
    check_unread_sections(schema, file_cfg, overrides, str(path or "overrides"))
    base = OmegaConf.structured(schema)
    OmegaConf.set_struct(base, True)
    _open_dict_sections(base)
    merged = base
    if file_cfg is not None:
        check_section_values(base, file_cfg, str(path))
        upgrade_node(schema, file_cfg, str(path))
        try:
            merged = OmegaConf.merge(merged, file_cfg)
        except OmegaConfBaseException as e:
            raise explain_config_error(schema, e, str(path)) from None
    for item in overrides:
        item = upgrade_override(schema, item)
        if item is None:
            continue
        key, _, value = item.partition("=")
        try:
            parsed = OmegaConf.from_dotlist([item])
            section = OmegaConf.select(merged, key, default=None)
            if isinstance(section, DictConfig) and not is_free_mapping(section) \
                    and not OmegaConf.is_dict(OmegaConf.select(parsed, key)):
                raise BatonError(f"override '{item}': {key} is a section (keys {', '.join(sorted(section.keys()))}); "
                                 f"set one of its keys ({key}.KEY=VALUE) or {key}={{KEY: VALUE, ...}}")
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
    """A config written by `to_yaml` (a run's config.yaml, a checkpoint's `config`), also one written
    before keys moved: old keys are read as their new spelling, silently (the user wrote none of it)."""
    node = OmegaConf.create(text)
    schema = schema_for_node(schema, node, [])
    upgrade_node(schema, node, "saved config", warn=False)
    merged = OmegaConf.merge(OmegaConf.structured(schema), node)
    return OmegaConf.to_object(merged)  # type: ignore[return-value]
