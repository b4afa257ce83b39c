"""Multi-seed results: mean ± std of each report row's retrieval metrics over seeds.

`baton report --out runs/results/results.md --seeds runs/demo runs/demo-seed1 runs/demo-seed2`
reads each run's report.json (written by `baton report`), matches rows by name, and writes a
markdown table of mean ± std (percentages) plus results.json with the per-seed values, the mean
and the std of every metric. `make results SEEDS="0 1 2"` runs the demo once per seed, then this.

Why: one seed of a tiny demo moves Recall@1 by a point or two (another class split, init, order),
as much as the differences between the rows; a table over seeds says which differences are real.
The std is the sample standard deviation (ddof = 1, numpy's `std(..., ddof=1)`), the usual
"± std over seeds" of DML papers; with one seed it is undefined and shown as n/a.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from baton.errors import BatonError
from baton.io import write_json_atomic, write_text_atomic

# (metric key in metrics.json / report.json, column title): the columns of both report tables
COLUMNS = [("recall@1", "Recall@1"), ("recall@2", "Recall@2"), ("recall@4", "Recall@4"),
           ("recall@8", "Recall@8"), ("map@r", "MAP@R"), ("nmi", "NMI")]


def read_report(run: str | Path) -> list[dict]:
    """The rows of RUN/report.json (RUN may also be the report.json itself)."""
    path = Path(run)
    f = path if path.suffix == ".json" else path / "report.json"
    if not f.is_file():
        raise BatonError(f"--seeds {run}: no {f} (run `make demo SEED=...` or `baton report` there first)")
    try:
        rows = json.loads(f.read_text())["rows"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise BatonError(f"{f} is not a report.json written by `baton report` ({e}); re-run it") from None
    names = [r.get("name") for r in rows]
    if len(set(names)) != len(names):
        raise BatonError(f"{f} has rows with the same name: {names}; give every --row its own name")
    return rows


def aggregate(reports: Sequence[list[dict]], sources: Sequence[str] | None = None) -> list[dict]:
    """Rows in the first report's order, each {name, n, values: {metric: [per seed]}, mean, std}.

    Rows that only later reports have are not averaged (write_results names them). A row of the
    first report missing from another, or a metric missing/NaN in some row, is an error: a mean
    over a different set of seeds per row would compare unlike things silently.
    """
    if not reports:
        raise BatonError("--seeds needs at least one run directory")
    sources = list(sources or [f"report {i}" for i in range(len(reports))])
    out = []
    for name in [r["name"] for r in reports[0]]:
        values: dict[str, list[float]] = {k: [] for k, _ in COLUMNS}
        for src, rows in zip(sources, reports):
            row = next((r for r in rows if r["name"] == name), None)
            if row is None:
                raise BatonError(f"row {name!r} is missing from {src}: every seed's report needs the same rows")
            for k, _ in COLUMNS:
                v = row.get(k)
                if v is None or (isinstance(v, float) and math.isnan(v)):
                    raise BatonError(f"row {name!r} of {src} has no {k} value; re-run its evaluation")
                values[k].append(float(v))
        n = len(reports)
        mean = {k: float(np.mean(v)) for k, v in values.items()}
        std = {k: float(np.std(v, ddof=1)) if n > 1 else None for k, v in values.items()}
        out.append({"name": name, "n": n, "values": values, "mean": mean, "std": std})
    return out


def markdown_table(rows: list[dict]) -> str:
    def cell(r: dict, k: str) -> str:
        s = r["std"][k]
        return f"{100 * r['mean'][k]:.1f} ± " + ("n/a" if s is None else f"{100 * s:.1f}")

    lines = ["| model | " + " | ".join(t for _, t in COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    lines += ["| " + r["name"] + " | " + " | ".join(cell(r, k) for k, _ in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def write_results(out: str | Path, runs: Sequence[str | Path],
                  title: str = "baton demo: retrieval on held-out classes over seeds") -> list[dict]:
    """Aggregate RUN/report.json over `runs`; write `out` (markdown) and results.json beside it."""
    out = Path(out)
    runs = [str(r) for r in runs]
    reports = [read_report(r) for r in runs]
    rows = aggregate(reports, runs)
    table = markdown_table(rows)
    extra = sorted({r["name"] for rep in reports for r in rep} - {r["name"] for r in rows})
    md = [f"# {title}", "",
          f"Mean ± std (sample std, ddof 1) over {len(runs)} seed(s), percentages; "
          "each seed: its own class split, initialisation, order and augmentation.", "",
          table, "", "Runs: " + ", ".join(runs), ""]
    if extra:  # rows of later runs that the first lacks: not averaged, but said
        md += ["Left out (not in the first run's report): " + ", ".join(extra), ""]
    write_text_atomic(out, "\n".join(md))
    write_json_atomic(out.parent / "results.json", {"runs": runs, "rows": rows, "left_out": extra})
    print(table)
    return rows
