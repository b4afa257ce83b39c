"""The stage list, written once: what `baton COMMAND` runs, and which stages run as jobs.

`baton/cli.py` dispatches through `COMMANDS`; `baton submit` and `python -m slurm.task` accept the
stages of `JOB_STAGES`. A new stage is one line in `COMMANDS` (and one in `JOB_STAGES` if it can
be submitted).
"""

from __future__ import annotations

from baton.registry import Registry

_COMMANDS = {  # name -> ("module:function" taking argv, one-line help)
    "shards": ("data_prep.cli:main", "write WebDataset shards from folders, CSV/TSV or the emoji designs"),
    "pretrain": ("pretrain.train:main",
                 "pretrain a backbone (clip, dino, glip) on shards: baton pretrain CONFIG [key=value ...]"),
    "export": ("pretrain.export:main", "export a pretrain checkpoint as a backbone: baton export CHECKPOINT OUT"),
    "ground": ("pretrain.glip.ground:main", 'boxes of a prompt\'s phrases from a glip run: baton ground RUN IMAGE "prompt"'),
    "finetune": ("finetune.train:main", "finetune a backbone with a DML loss: baton finetune CONFIG [key=value ...]"),
    "evaluate": ("finetune.evaluate_cli:main", "retrieval metrics of a backbone on held-out classes"),
    "report": ("finetune.report:main", "collect the demo's metrics and plots into report.md"),
    "submit": ("slurm.submit:main", "run a stage as a Slurm job: baton submit STAGE ARGS [cluster.KEY=VALUE ...]"),
    "status": ("slurm.control:status_main", "state of a submitted run: baton status RUN_DIR"),
    "cancel": ("slurm.control:cancel_main", "cancel a submitted run: baton cancel RUN_DIR"),
    "logs": ("slurm.control:logs_main", "a submitted run's output: baton logs RUN_DIR [-f]"),
    "recipes": ("baton.recipes:main", "the packaged recipes and sbatch templates: baton recipes [copy NAME [DEST]]"),
}

# `baton COMMAND` -> its main(argv); the stage owns its arguments.
COMMANDS = Registry("command", {name: target for name, (target, _) in _COMMANDS.items()},
                    help={name: help_ for name, (_, help_) in _COMMANDS.items()})

# Stages that run as a (Slurm) job -> the schema of their CONFIG [key=value ...], or None. A stage
# with a schema has its config validated before queueing, frozen into the run directory, and
# checkpoints that a requeued attempt continues with `resume=latest`; the others are rerun (shards
# resume by themselves: a rerun writes only the missing shards).
JOB_STAGES = Registry("stage", {
    "pretrain": "pretrain.config:PretrainConfig",
    "finetune": "finetune.config:FinetuneConfig",
    "shards": None,
})


def takes_config(stage: str) -> bool:
    """Whether `stage` takes CONFIG [key=value ...] (and so resumes with `resume=latest`)."""
    return JOB_STAGES.spec(stage) is not None
