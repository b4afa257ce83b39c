"""Source registry: `baton shards NAME ...` runs SOURCES[NAME].

Each source module has NAME (and optionally ALIASES), HELP, `add_arguments(parser)`, `run(args) -> int`, and an
`iter_records(...)` generator of `data_prep.writer.Sample` / `Skip` that `run` feeds to the
shared writer. Add a source by writing one module here and listing it below.
"""

from __future__ import annotations

from types import ModuleType

from data_prep.sources import emoji, folder, grounding_emoji, img2dataset, odvg, table

MODULES: tuple[ModuleType, ...] = (emoji, folder, table, img2dataset, grounding_emoji, odvg)
SOURCES: dict[str, ModuleType] = {name: m for m in MODULES for name in (m.NAME, *getattr(m, "ALIASES", ()))}
