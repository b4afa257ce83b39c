"""The `baton` command: one subcommand per stage.

Each subcommand hands the rest of the command line to its stage's `main(argv)`; the stage owns
its arguments. A `BatonError` is printed as one clear line and the exit status is 2.
Run under torchrun for several processes: `torchrun --nproc_per_node 2 -m baton pretrain CONFIG`.
"""

from __future__ import annotations

import sys

from baton.errors import BatonError
from baton.stages import COMMANDS


def _usage() -> str:
    lines = ["usage: baton COMMAND [ARGS ...]", "", "commands:"]
    lines += [f"  {name:<10} {COMMANDS.help[name]}" for name in COMMANDS]
    lines += ["", "`baton COMMAND --help` for a command's arguments."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from baton import __version__
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    try:
        result = COMMANDS[name](rest)   # imports the stage's module only now
    except BatonError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
