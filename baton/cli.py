"""The `baton` command: one subcommand per stage.

Each subcommand hands the rest of the command line to its stage's `main(argv)`; the stage owns
its arguments. A `BatonError` is printed as one clear line and the exit status is 2.
Run under torchrun for several processes: `torchrun --nproc_per_node 2 -m baton pretrain CONFIG`.
"""

from __future__ import annotations

import importlib
import sys

from baton.errors import BatonError

# subcommand -> ("module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "shards": ("data_prep.cli:main", "write WebDataset shards from folders, CSV/TSV or the emoji designs"),
    "pretrain": ("pretrain.train:main", "pretrain CLIP on shards: baton pretrain CONFIG [key=value ...]"),
    "export": ("pretrain.export:main", "export a pretrain checkpoint as a backbone: baton export CHECKPOINT OUT"),
    "ground": ("pretrain.glip.ground:main", 'boxes of a prompt\'s phrases from a glip run: baton ground RUN IMAGE "prompt"'),
    "finetune": ("finetune.train:main", "finetune a backbone with a DML loss: baton finetune CONFIG [key=value ...]"),
    "evaluate": ("finetune.evaluate_cli:main", "retrieval metrics of a backbone on held-out classes"),
    "report": ("finetune.report:main", "collect the demo's metrics and plots into report.md"),
    "submit": ("slurm.submit:main", "run a stage as a Slurm job: baton submit STAGE ARGS [cluster.KEY=VALUE ...]"),
    "status": ("slurm.control:status_main", "state of a submitted run: baton status RUN_DIR"),
    "cancel": ("slurm.control:cancel_main", "cancel a submitted run: baton cancel RUN_DIR"),
    "logs": ("slurm.control:logs_main", "a submitted run's output: baton logs RUN_DIR [-f]"),
}


def _usage() -> str:
    lines = ["usage: baton COMMAND [ARGS ...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
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
    if name not in COMMANDS:
        print(f"error: unknown command '{name}'. Known commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        result = func(rest)
    except BatonError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
