"""`baton evaluate GLIP_RUN [--shards SHARDS ...] --out DIR`: a GLIP run's held-out scores as metrics.json.

What the run logs every `train.eval_every` steps (`pretrain.glip.evaluation`), on shards named on
the command line: phrase-grounding Recall@1 / @5 at IoU >= 0.5 and, with `pip install 'baton[glip]'`
(torchmetrics + pycocotools), zero-shot detection mAP of the scenes' classes prompted by their
names. The model is rebuilt from the checkpoint's own config (`pretrain.glip.ground.load_run`), so
its tokenizer, image size and post-processing are the run's; a flag given here overrides the
matching key (below), and every other evaluation key keeps the run's value.

GLIP_RUN is a glip pretrain run directory, its `checkpoints/`, a step directory, or (with --shards)
a `baton export` of one: an export holds the image backbone only, and its backbone.json names the
checkpoint it came from, which is what is evaluated (an export whose checkpoint is gone is refused,
naming it). A GLIP export without --shards is a DML backbone like any other: `baton evaluate
EXPORT --data-root ...` gives its retrieval metrics.

`baton evaluate`'s retrieval flags (--data-root, --data-source, --split, --like, --seed, --no-grid,
--save-embeddings) have no meaning for grounding and are refused by name rather than ignored; the
GLIP flags are refused for any other model (`finetune/evaluate_cli.py` dispatches).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from baton.errors import BatonError

# Beside MODEL, --out and --device, each GLIP flag sets one key of the run's config: --shards
# glip.eval.shards, --max-samples glip.eval.max_samples, --batch-size glip.eval.batch_size, --max-skipped-fraction
# glip.eval.max_skipped_fraction, --detection-classes glip.detection_classes, --nms-iou glip.nms_iou.
GLIP_ONLY = ("--shards", "--max-samples", "--detection-classes", "--nms-iou")
# baton evaluate's retrieval flags: what each does there, named when a GLIP run refuses it
DML_ONLY = {"--like": "initialises a random backbone", "--seed": "seeds a random init and the folder split",
            "--data-source": "names a labelled DML dataset", "--data-root": "names a labelled DML dataset",
            "--split": "picks a DML dataset's split", "--no-grid": "skips the retrieval grid",
            "--save-embeddings": "saves retrieval embeddings"}


def _number(kind: type, lo: float, hi: float | None = None, open_lo: bool = False):
    """An argparse type: `kind` in [lo, hi] ((lo, hi] with open_lo), refused naming the range."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value < lo or (open_lo and value == lo) or (hi is not None and value > hi):
            bound = f"{'>' if open_lo else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
            raise argparse.ArgumentTypeError(f"must be a {kind.__name__} {bound}, not {text!r}")
        return value
    return parse


positive_int = _number(int, 1)


def add_glip_arguments(p: argparse.ArgumentParser) -> None:
    """The GLIP flags on `baton evaluate`'s parser (None: the run's own value)."""
    g = p.add_argument_group("a GLIP run (grounding)")
    g.add_argument("--shards", nargs="+", default=None,
                   help="GLIP: grounding shards (paths, URLs, brace patterns) to score; default: the run's glip.eval.shards")
    g.add_argument("--max-samples", type=positive_int, default=None,
                   help="GLIP: the first N scenes in shard order (default: all of them)")
    g.add_argument("--detection-classes", type=_number(int, 0), default=None,
                   help="GLIP: classes prompted for zero-shot mAP (0: grounding only; default: the run's)")
    g.add_argument("--nms-iou", type=_number(float, 0.0, 1.0, open_lo=True), default=None,
                   help="GLIP: the NMS IoU ranking a phrase's boxes and per-class detections (default: the run's)")


def given_flags(argv: list[str], parser: argparse.ArgumentParser) -> set[str]:
    """The option strings present on the command line (the parser has allow_abbrev=False)."""
    from baton.compat import parser_actions

    known = {s for a in parser_actions(parser) for s in a.option_strings}
    return {a.split("=", 1)[0] for a in argv if a.split("=", 1)[0] in known}


def glip_checkpoint(spec: str, grounding: bool) -> Optional[Path]:
    """The step directory to evaluate when MODEL `spec` is a glip pretrain run (or its checkpoints/ or a
    step directory) or, when `grounding` (--shards given), a GLIP export; None for any other model."""
    from baton.checkpoint import resolve_checkpoint
    from baton.handoff import META, read_meta

    p = Path(spec)
    if not p.exists():
        return None
    if (p / META).is_file():
        source = read_meta(p).source
        if not grounding or source.get("method") != "glip":
            return None
        ckpt = source.get("checkpoint")
        if not ckpt or not Path(ckpt).exists():
            raise BatonError(f"{p} is a GLIP export, which holds the image backbone only; grounding needs the "
                             f"whole model, from the checkpoint it was exported from ({ckpt or 'not recorded'}), "
                             f"which is not there: pass the GLIP run directory instead")
        return resolve_checkpoint(ckpt)
    try:
        step_dir = resolve_checkpoint(p)
    except BatonError:
        return None
    meta = step_dir / "meta.json"
    method = json.loads(meta.read_text()).get("method") if meta.is_file() else None
    return step_dir if method == "glip" else None


def refuse_dml_flags(given: set[str], spec: str) -> None:
    bad = sorted(f for f in given if f in DML_ONLY)
    if bad:
        why = "; ".join(f"{f} {DML_ONLY[f]}" for f in bad)
        raise BatonError(f"{', '.join(bad)}: not for a GLIP run ({spec} is scored on grounding shards, "
                         f"--shards): {why}. To score its backbone for retrieval, `baton export {spec} OUT` "
                         f"and `baton evaluate OUT --data-root ...`")


def refuse_glip_flags(given: set[str], spec: str) -> None:
    bad = sorted(f for f in given if f in GLIP_ONLY)
    if bad:
        raise BatonError(f"{', '.join(bad)}: only for a GLIP run (a glip pretrain run directory, or a GLIP "
                         f"export with --shards); {spec} is evaluated for retrieval on --data-root")


def overridden(cfg, args: argparse.Namespace) -> list[str]:
    """Set the run's keys from the flags given; `key=value` of each (recorded in metrics.json).
    glip.eval.max_samples is --max-samples or None (every scene): the run's own bound was for monitoring."""
    shards = args.shards[0] if args.shards and len(args.shards) == 1 else args.shards
    values = {"glip.eval.shards": shards, "glip.eval.batch_size": args.batch_size,
              "glip.eval.max_skipped_fraction": args.max_skipped_fraction,
              "glip.detection_classes": args.detection_classes, "glip.nms_iou": args.nms_iou}
    done = []
    for key, value in values.items():
        if value is not None:
            *path, name = key.split(".")
            node = cfg
            for part in path:
                node = getattr(node, part)
            setattr(node, name, value)
            done.append(f"{key}={value}")
    cfg.glip.eval.max_samples = args.max_samples
    return done + [f"glip.eval.max_samples={args.max_samples}"]


def run_glip(args: argparse.Namespace, given: set[str], step_dir: Path) -> int:
    """Score the run at `step_dir` and write OUT/metrics.json (as the retrieval evaluation does)."""
    from baton.io import write_json_atomic
    from baton.logs import setup_logging
    from baton.run import choose_device
    from pretrain.glip.evaluation import evaluate_glip
    from pretrain.glip.ground import load_run

    refuse_dml_flags(given, args.model)
    if "--max-skipped-fraction" not in given:
        args.max_skipped_fraction = None      # the run's glip.eval.max_skipped_fraction (the parser's default is DML's)
    log = setup_logging()
    method, model = load_run(step_dir)
    cfg = method.cfg
    keys = overridden(cfg, args)
    if not cfg.glip.eval.shards:
        raise BatonError(f"{args.model}: the run has no glip.eval.shards; name the grounding shards to score with "
                         f"--shards (e.g. data/grounding-emoji/test)")
    device = choose_device(args.device)
    log.info("evaluate GLIP %s on %s", step_dir, cfg.glip.eval.shards)
    scores = evaluate_glip(model.to(device), method, device, key="--shards" if args.shards else "glip.eval.shards",
                           fraction_key="--max-skipped-fraction" if args.max_skipped_fraction is not None
                           else "glip.eval.max_skipped_fraction of the run; --max-skipped-fraction")
    step = json.loads((step_dir / "meta.json").read_text()).get("step")   # glip_checkpoint read it
    result = {**scores, "shards": cfg.glip.eval.shards, "model": f"GLIP {cfg.glip.backbone} ({step_dir})",
              "model_spec": args.model, "checkpoint": str(step_dir), "step": step, "overrides": keys}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "metrics.json", result)
    print(json.dumps({k: round(v, 4) for k, v in scores.items()}))
    return 0
