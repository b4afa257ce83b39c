"""Old spellings of config keys and values, read as the current ones (`baton.config` calls these).

A recipe, a command line or a checkpoint's saved config written before a key moved must keep
working: the schema's RENAMED_KEYS / DROPPED_KEYS / RENAMED_VALUES (described in `baton.config`)
say how each old spelling reads now, and every one read logs a warning naming the new spelling, so
the user can update the recipe; saved configs are upgraded silently (nobody can edit them).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from omegaconf import OmegaConf

from baton.errors import BatonError

_MISSING = object()
_log = logging.getLogger("baton")


def rename_keys(node: Any, renamed: Mapping[str, str], source: str, warn: bool = True) -> None:
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
            _log.warning("%s: config key '%s' is now spelled '%s' (read as that)", source, old, new)


def drop_keys(node: Any, dropped: Mapping[str, str], source: str, warn: bool = True) -> None:
    """Remove each key of `dropped` present in `node` (in place), with a warning giving the reason."""
    if not OmegaConf.is_dict(node):
        return
    for key, why in dropped.items():
        value = OmegaConf.select(node, key, default=_MISSING)
        if value is _MISSING:
            continue
        parent, _, leaf = key.rpartition(".")
        (OmegaConf.select(node, parent) if parent else node).pop(leaf)
        if warn and not (OmegaConf.is_dict(value) and len(value) == 0):   # emptied by a rename: nothing lost
            _log.warning("%s: config key '%s' is not read any more and was left out: %s", source, key, why)


def rename_values(node: Any, renamed: Mapping[str, Mapping[Any, Any]], source: str, warn: bool = True) -> None:
    """Replace an old spelling of a value (`renamed[key][old]`) by the new one, in place, with a warning."""
    if not OmegaConf.is_dict(node):
        return
    for key, values in renamed.items():
        value = OmegaConf.select(node, key, default=_MISSING)
        if value is _MISSING or isinstance(value, bool) or not _hashable(value) or value not in values:
            continue
        OmegaConf.update(node, key, values[value], force_add=True)
        if warn:
            _log.warning("%s: config key %s=%r is now spelled %s=%s (read as that)", source, key, value, key,
                         "null" if values[value] is None else repr(values[value]))


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def upgrade_node(schema: Any, node: Any, source: str, warn: bool = True) -> None:
    """Apply the schema's RENAMED_KEYS, DROPPED_KEYS and RENAMED_VALUES to a YAML node, in place."""
    rename_keys(node, getattr(schema, "RENAMED_KEYS", {}), source, warn)
    drop_keys(node, getattr(schema, "DROPPED_KEYS", {}), source, warn)
    rename_values(node, getattr(schema, "RENAMED_VALUES", {}), source, warn)


def upgrade_override(schema: Any, item: str) -> str | None:
    """A `key=value` override in the current spelling (None: the key is dropped), with a warning."""
    key, _, value = item.partition("=")
    for old, new in getattr(schema, "RENAMED_KEYS", {}).items():
        if key == old or key.startswith(old + "."):
            _log.warning("override '%s': config key '%s' is now spelled '%s' (read as that)", item, old, new)
            key = new + key[len(old):]
            break
    for old, why in getattr(schema, "DROPPED_KEYS", {}).items():
        if key == old or key.startswith(old + "."):
            _log.warning("override '%s': config key '%s' is not read any more and was left out: %s",
                         item, old, why)
            return None
    values = getattr(schema, "RENAMED_VALUES", {}).get(key)
    if values:
        parsed = OmegaConf.select(OmegaConf.from_dotlist([f"{key}={value}"]), key)
        if _hashable(parsed) and not isinstance(parsed, bool) and parsed in values:
            new = values[parsed]
            value = "null" if new is None else str(new)
            _log.warning("override '%s': %s=%r is now spelled %s=%s (read as that)", item, key, parsed, key, value)
    return f"{key}={value}"
