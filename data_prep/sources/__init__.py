"""Source registry: `baton shards NAME ...` runs SOURCES[NAME].run(args).

Each source module has NAME (and optionally ALIASES), HELP, `add_arguments(parser)`, `run(args) -> int`, and an
`iter_records(...)` generator of `data_prep.writer.Sample` / `Skip` that `run` feeds to the
shared writer. Add a source by writing one module here and adding its line (and its aliases') below.
"""

from __future__ import annotations

from baton.registry import Registry

# source name or alias -> its module (the parser of `baton shards` imports them all, for its help)
SOURCES = Registry("data source", {
    "emoji": "data_prep.sources.emoji",
    "folder": "data_prep.sources.folder",
    "table": "data_prep.sources.table",
    "csv": "data_prep.sources.table",
    "parquet": "data_prep.sources.table",
    "img2dataset": "data_prep.sources.img2dataset",
    "grounding-emoji": "data_prep.sources.grounding_emoji",
    "odvg": "data_prep.sources.odvg",
    "mdetr": "data_prep.sources.mdetr",
    "coco-detection": "data_prep.sources.coco_detection",
})


def source_modules() -> list:
    """Each source's module once (aliases left out), in the order of SOURCES."""
    return [SOURCES[name] for name in SOURCES if SOURCES[name].NAME == name]
