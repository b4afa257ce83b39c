"""Source registry: `baton shards NAME ...` runs SOURCES[NAME].

Each source module has NAME, HELP, `add_arguments(parser)`, `run(args) -> int`, and an
`iter_records(...)` generator of `data_prep.writer.Sample` / `Skip` that `run` feeds to the
shared writer. Add a source by writing one module here and listing it below.
"""

from __future__ import annotations

from types import ModuleType

from data_prep.sources import emoji, folder, table

SOURCES: dict[str, ModuleType] = {m.NAME: m for m in (emoji, folder, table)}
