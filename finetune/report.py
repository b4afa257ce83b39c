"""`baton report --out runs/demo/report.md --row "NAME=EVAL_DIR" ... [--loss-curve NAME=metrics.jsonl ...]
[--grid retrieval_grid.png]`

Collects `baton evaluate` outputs into one markdown table (Recall@1/2/4/8, MAP@R, NMI per row, in
the order given, so the story reads top-down: pixels, random init, pretrained, finetuned; the
evaluations of GLIP runs, grounding R@1/5 and detection mAP, in a table of their own), plots
the training loss curves next to it (loss_curves.png), links a retrieval grid, writes the same
numbers to report.json and prints the table.

`baton report --out runs/results/results.md --seeds runs/demo runs/demo-seed1 ...` instead
aggregates the report.json of several seeds' runs into mean ± std per row (finetune/results.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from baton.errors import BatonError
from baton.io import atomic_path, write_json_atomic, write_text_atomic
from baton.logs import read_metrics
from finetune.results import COLUMNS, write_results

# (metric key of `baton evaluate GLIP_RUN`'s metrics.json, column title): the grounding table
GROUNDING_COLUMNS = [("grounding_r1", "grounding R@1"), ("grounding_r5", "grounding R@5"),
                     ("zero_shot_map", "detection mAP"), ("zero_shot_map50", "detection mAP@50")]


def _pair(text: str, flag: str) -> tuple[str, Path]:
    if "=" not in text:
        raise BatonError(f"{flag} '{text}' must be NAME=PATH")
    name, path = text.split("=", 1)
    return name.strip(), Path(path.strip())


def read_row(name: str, path: Path) -> dict:
    f = path / "metrics.json" if path.is_dir() or not path.suffix else path
    if not f.is_file():
        raise BatonError(f"--row {name}: no metrics at {f} (run `baton evaluate ... --out {path}` first)")
    try:
        metrics = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        metrics = e
    if not isinstance(metrics, dict):
        why = metrics if isinstance(metrics, Exception) else f"a {type(metrics).__name__}, not an object"
        raise BatonError(f"--row {name}: {f} is not a metrics.json of `baton evaluate` ({why}); "
                         f"re-run `baton evaluate ... --out {path}`")
    return {"name": name, "path": str(f), **metrics}


def markdown_table(rows: list[dict], columns: list[tuple[str, str]] = COLUMNS) -> str:
    def cell(v) -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"

    lines = ["| model | " + " | ".join(t for _, t in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    lines += ["| " + r["name"] + " | " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def ranking_key(row: dict) -> str:
    """The metric a row is ordered and tabled by: Recall@1 of a retrieval evaluation, grounding R@1
    of a GLIP run's (`baton evaluate GLIP_RUN`)."""
    for key in ("recall@1", "grounding_r1"):
        if key in row:
            return key
    raise BatonError(f"--row {row['name']}: {row['path']} has neither retrieval (recall@1) nor grounding "
                     f"(grounding_r1) scores; is it a `baton evaluate` metrics.json?")


def _loss_key(rows: list[dict]) -> str | None:
    keys = [k for r in rows for k in r if "loss" in k]
    return "loss" if "loss" in keys else (keys[0] if keys else None)


def plot_loss_curves(curves: list[tuple[str, Path]], out: Path) -> Path | None:
    """One panel per curve: the stages' losses have unrelated scales (CLIP vs SoftTriple)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = []
    for name, path in curves:
        rows = read_metrics(path)
        key = _loss_key(rows)
        if key is None:
            raise BatonError(f"--loss-curve {name}: no loss values in {path} (expected metrics.jsonl rows "
                             f"with a 'loss' key)")
        pts = [(r["step"], r[key]) for r in rows if key in r]
        series.append((name, key, pts))
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.2), squeeze=False)
    for ax, (name, key, pts) in zip(axes[0], series):
        ax.plot([s for s, _ in pts], [v for _, v in pts])
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return out


def check_order(rows: list[dict], names: list[str], strict: bool = True) -> tuple[bool, str]:
    """Whether Recall@1 increases along `names` (row names; strictly, or at least does not
    decrease), and a sentence saying so."""
    by_name = {r["name"]: r for r in rows}
    missing = [n for n in names if n not in by_name]
    if missing:
        flag = "--expect-increasing" if strict else "--expect-not-decreasing"
        raise BatonError(f"{flag} names rows that are not in the table: {', '.join(missing)} "
                         f"(rows: {', '.join(by_name)})")
    keys = {ranking_key(by_name[n]) for n in names}
    if len(keys) > 1:
        raise BatonError(f"expected ordering {', '.join(names)}: mixes retrieval and grounding rows "
                         f"({', '.join(sorted(keys))}); order rows of one kind")
    key = keys.pop()
    values = [by_name[n][key] for n in names]
    holds = all((a < b) if strict else (a <= b) for a, b in zip(values, values[1:]))
    chain = (" < " if strict else " <= ").join(f"{n} ({100 * v:.1f})" for n, v in zip(names, values))
    title = "Recall@1" if key == "recall@1" else "grounding R@1"
    return holds, f"Expected {title} ordering {chain}: **{'holds' if holds else 'does NOT hold'}**."


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="baton report", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="the markdown file to write, e.g. runs/demo/report.md")
    p.add_argument("--row", action="append", default=[], help="NAME=EVAL_DIR (repeatable, in table order)")
    p.add_argument("--loss-curve", action="append", default=[], help="NAME=metrics.jsonl (repeatable)")
    p.add_argument("--grid", help="a retrieval_grid.png to link")
    p.add_argument("--title", default="baton demo: retrieval on held-out classes")
    p.add_argument("--expect-increasing", action="append", default=[], help="NAME,NAME,...: rows whose "
                   "Recall@1 must strictly increase in this order (repeatable); the report states whether it "
                   "does (report.json: order_holds) and the command fails (exit 1) when it does not")
    p.add_argument("--expect-not-decreasing", action="append", default=[], help="NAME,NAME,...: as "
                   "--expect-increasing, but equal values pass")
    p.add_argument("--seeds", nargs="+", metavar="RUN_DIR", help="instead of --row: one run directory per "
                   "seed, each with a report.json; writes mean ± std per row to --out and results.json")
    args = p.parse_args(argv)
    if args.seeds:
        if args.row:
            raise BatonError("baton report takes either --row (one run) or --seeds (several runs), not both")
        write_results(args.out, args.seeds)
        return 0
    if not args.row:
        raise BatonError("baton report needs at least one --row NAME=EVAL_DIR (or --seeds RUN_DIR ...)")
    out = Path(args.out)
    rows = [read_row(*_pair(r, "--row")) for r in args.row]
    curves = [_pair(c, "--loss-curve") for c in args.loss_curve]
    for name, path in curves:
        if not path.is_file():
            raise BatonError(f"--loss-curve {name}: {path} does not exist")
    retrieval = [r for r in rows if ranking_key(r) == "recall@1"]
    grounding = [r for r in rows if ranking_key(r) == "grounding_r1"]
    md = [f"# {args.title}", ""]
    tables = []
    if retrieval:
        tables.append(markdown_table(retrieval))
        first = retrieval[0]
        md += ["Percentages; queries are all held-out images, each against the rest.", "", tables[-1], "",
               f"{first.get('n_queries', '?')} queries over {first.get('n_classes', '?')} classes.", ""]
    if grounding:
        tables.append(markdown_table(grounding, GROUNDING_COLUMNS))
        md += ["## Grounding" if retrieval else "Percentages.", "",
               "Phrase grounding Recall@1/5 (a phrase's top box at IoU >= 0.5, Flickr30k's protocol) and "
               "detection mAP (COCO's, torchmetrics) with the scenes' class names as the prompt.", "",
               tables[-1], ""]
        md += [f"- {r['name']}: {int(r.get('grounding_regions', 0))} regions"
               + (f", {int(r['zero_shot_classes'])} prompted classes" if "zero_shot_classes" in r else "")
               + f" ({r.get('shards', '?')})" for r in grounding] + [""]
    table = "\n\n".join(tables)
    checks = [check_order(rows, [n.strip() for n in chain.split(",")], strict)
              for flag, strict in ((args.expect_increasing, True), (args.expect_not_decreasing, False))
              for chain in flag]
    order_holds = all(holds for holds, _ in checks) if checks else None
    order_lines = [line for _, line in checks]
    md += [line for line in order_lines for line in (line, "")]
    loss_png = plot_loss_curves(curves, out.parent / "loss_curves.png") if curves else None
    if loss_png:
        md += ["## Training loss", "", f"![loss curves]({os.path.relpath(loss_png, out.parent)})", ""]
    grid = None
    if args.grid:
        if not Path(args.grid).is_file():
            raise BatonError(f"--grid {args.grid} does not exist (baton evaluate writes retrieval_grid.png)")
        grid = os.path.relpath(args.grid, out.parent)
        md += ["## Retrieval examples", "", f"![retrieval grid]({grid})", ""]
    md += ["## Rows", ""] + [f"- **{r['name']}**: {r.get('model', '?')} ({r['path']})" for r in rows] + [""]
    write_text_atomic(out, "\n".join(md))
    write_json_atomic(out.parent / "report.json",
                      {"rows": rows, "loss_curves": {n: str(pth) for n, pth in curves},
                       "loss_plot": str(loss_png) if loss_png else None, "grid": grid,
                       "order_holds": order_holds})
    print(table)
    for line in order_lines:
        print(line)
    if order_holds is False:
        print(f"baton report: an expected ordering does not hold (report written to {out})", file=sys.stderr)
        return 1
    return 0
