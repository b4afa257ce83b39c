"""Tables of named choices (methods, strategies, losses, backbones, data sources, stages, ...).

Every table in the project is a `Registry`: a name maps to a lazy "module:attr" string (or
"module" for a whole module), imported the first time that name is used, so choosing `ddp` never
imports DeepSpeed and `baton --help` imports no stage. An already-built object may be given
instead of a string (nothing to import). An unknown name is always the same error:

    unknown train.strategy 'dpp' (did you mean 'ddp'?): choose one of ddp, fsdp, deepspeed

Every registry made is remembered (`all_registries`), so one test resolves every entry of every
table and fails when one points nowhere.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import weakref
from typing import Any, Iterable, Iterator

from baton.errors import BatonError

_ALL: "weakref.WeakSet[Registry]" = weakref.WeakSet()


class UnknownName(BatonError, LookupError):
    """A name that is not in a registry; the message lists the choices."""


def unknown_name(what: str, name: Any, choices: Iterable[str], extra: str = "",
                 also: Iterable[str] = ()) -> UnknownName:
    """The one error for a name that is not among `choices`, with the closest one as a hint
    (`also`: further names to hint at, e.g. aliases; `extra`: appended to the message)."""
    choices = [str(c) for c in choices]
    hint = difflib.get_close_matches(str(name), choices + list(also), n=1, cutoff=0.5)
    return UnknownName(f"unknown {what} {name!r}" + (f" (did you mean '{hint[0]}'?)" if hint else "") +
                       f": choose one of {', '.join(choices)}" + extra)


def resolve(spec: str) -> Any:
    """The object a "module:attr" (or "module") string names, importing the module."""
    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr) if attr else module


class Registry:
    """Names -> lazy "module:attr" entries (or objects), in the order given; `what` names the
    table in errors (the config key, e.g. "train.strategy"), `help` holds a line per name, `usage`
    (e.g. "NAME or NAME:ARG forms") is appended to the unknown-name error."""

    def __init__(self, what: str, entries: dict[str, Any], help: dict[str, str] | None = None,
                 usage: str = ""):
        self.what, self.usage = what, usage
        self._entries = dict(entries)
        self._resolved: dict[str, Any] = {}
        self.help = dict(help or {})
        caller = inspect.currentframe().f_back  # type: ignore[union-attr]
        self.owner = caller.f_globals.get("__name__", "?") if caller else "?"   # the module holding it
        _ALL.add(self)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return list(self._entries)

    def spec(self, name: str) -> Any:
        """The entry as written ("module:attr" or the object), without importing anything."""
        if name not in self._entries:
            raise unknown_name(self.what, name, self._entries, f" ({self.usage})" if self.usage else "")
        return self._entries[name]

    def __getitem__(self, name: str) -> Any:
        """The object `name` stands for, imported on first use; `UnknownName` lists the choices."""
        if name not in self._resolved:
            entry = self.spec(name)
            self._resolved[name] = resolve(entry) if isinstance(entry, str) else entry
        return self._resolved[name]

    def is_resolved(self, name: str) -> bool:
        return name in self._resolved

    def __repr__(self) -> str:
        return f"Registry({self.what!r} in {self.owner}: {', '.join(self._entries)})"


def all_registries() -> list[Registry]:
    """Every registry alive (those of the modules imported so far), by owning module."""
    return sorted(_ALL, key=lambda r: (r.owner, r.what))
