"""`baton shards SOURCE ...`: write WebDataset shards from one of the registered sources.

`baton.cli` strips the word `shards` and calls `main(argv)`. Argument errors are raised as
`BatonError` (exit status 2, one clear line) rather than argparse's SystemExit, so callers and
tests get a status back instead of an exception.
"""

from __future__ import annotations

import argparse

from baton.compat import parser_actions
from baton.errors import BatonError
from data_prep.options import positive_int
from data_prep.sources import SOURCES, source_modules


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and sys.exit(2)
        raise BatonError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="baton shards", description="Write WebDataset shards (key.png|jpg, key.txt, "
                     "key.json) plus stats.json from an image-text source; in parallel (--workers), "
                     "as a job-array slice (--part i/n), and resumably: a rerun writes only what is missing.")
    sub = parser.add_subparsers(dest="source", metavar="SOURCE", parser_class=_Parser)
    for module in source_modules():
        p = sub.add_parser(module.NAME, aliases=getattr(module, "ALIASES", ()), help=module.HELP,
                           description=module.HELP)
        module.add_arguments(p)
        for action in parser_actions(p):  # sizes and counts must be >= 1 for every source
            if action.dest in ("size", "shard_size", "max_classes"):
                action.type = positive_int
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.source is None:
        raise BatonError(f"baton shards: name a source, one of {', '.join(m.NAME for m in source_modules())} "
                         f"(e.g. `baton shards emoji --out data/emoji`)")
    return SOURCES[args.source].run(args)
