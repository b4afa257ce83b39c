"""Multi-seed results (`baton report --seeds`, finetune/results.py): mean ± std per row over the
seeds' report.json files equal numpy's, on made-up metric files run through `baton report`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from baton.cli import main as cli
from baton.errors import BatonError
from finetune.results import write_results

METRICS = ["recall@1", "recall@2", "recall@4", "recall@8", "map@r", "nmi"]
ROWS = ["random init", "CLIP pretrained", "SoftTriple + ELG"]


def make_seed_run(run: Path, rng: np.random.Generator, rows=ROWS) -> dict[str, dict[str, float]]:
    """One seed's run dir: made-up metrics.json per row, collected by `baton report --row`."""
    values = {}
    args = ["report", "--out", str(run / "report.md")]
    for i, name in enumerate(rows):
        m = {k: float(v) for k, v in zip(METRICS, rng.uniform(0, 1, len(METRICS)))}
        d = run / f"eval_{i}"
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({**m, "n_queries": 10, "n_classes": 5}))
        values[name] = m
        args += ["--row", f"{name}={d}"]
    assert cli(args) == 0
    return values


def test_seeds_table_is_numpy_mean_and_std(tmp_path):
    rng = np.random.default_rng(7)
    runs = [tmp_path / f"seed{s}" for s in range(3)]
    truth = [make_seed_run(r, rng) for r in runs]
    out = tmp_path / "results" / "results.md"
    assert cli(["report", "--out", str(out), "--seeds", *map(str, runs)]) == 0

    res = json.loads((out.parent / "results.json").read_text())
    assert [r["name"] for r in res["rows"]] == ROWS
    md = out.read_text()
    for row in res["rows"]:
        assert row["n"] == 3
        for k in METRICS:
            per_seed = np.array([t[row["name"]][k] for t in truth])
            assert row["values"][k] == pytest.approx(per_seed.tolist())
            assert row["mean"][k] == pytest.approx(np.mean(per_seed))
            assert row["std"][k] == pytest.approx(np.std(per_seed, ddof=1))
        r1 = np.array([t[row["name"]]["recall@1"] for t in truth])
        assert (f"| {row['name']} | {100 * r1.mean():.1f} ± {100 * r1.std(ddof=1):.1f} |") in md


def test_one_seed_has_no_std(tmp_path):
    truth = make_seed_run(tmp_path / "seed0", np.random.default_rng(1))
    out = tmp_path / "results.md"
    assert cli(["report", "--out", str(out), "--seeds", str(tmp_path / "seed0")]) == 0
    row = json.loads((tmp_path / "results.json").read_text())["rows"][0]
    assert row["mean"]["nmi"] == pytest.approx(truth[ROWS[0]]["nmi"]) and row["std"]["nmi"] is None
    assert "± n/a" in out.read_text()


def test_seeds_must_have_the_same_rows(tmp_path):
    rng = np.random.default_rng(2)
    make_seed_run(tmp_path / "a", rng)
    make_seed_run(tmp_path / "b", rng, rows=ROWS[:2])
    out = tmp_path / "results.md"
    with pytest.raises(BatonError, match="SoftTriple \\+ ELG.*missing from .*b"):
        write_results(out, [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(BatonError, match="no .*report.json"):
        write_results(out, [tmp_path / "a", tmp_path / "nowhere"])
    assert cli(["report", "--out", str(out), "--seeds", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert not out.exists()
    # the other way round: the rows both have are averaged, the third is named as left out
    assert cli(["report", "--out", str(out), "--seeds", str(tmp_path / "b"), str(tmp_path / "a")]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert [r["name"] for r in res["rows"]] == ROWS[:2] and res["left_out"] == [ROWS[2]]
    assert "Left out (not in the first run's report): SoftTriple + ELG" in out.read_text()


def test_an_expected_ordering_that_does_not_hold_fails_the_report(tmp_path, capsys):
    """`--expect-increasing` / `--expect-not-decreasing` fail the command (exit 1), with the report
    still written, when Recall@1 does not follow the order; they pass when it does."""
    rows = {"pixels": 0.3, "scratch": 0.5, "pretrained": 0.5, "finetuned": 0.6}
    args = ["report", "--out", str(tmp_path / "report.md")]
    for name, r1 in rows.items():
        d = tmp_path / name
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({k: r1 for k in METRICS}))
        args += ["--row", f"{name}={d}"]
    assert cli(args + ["--expect-increasing", "pixels,finetuned",
                       "--expect-not-decreasing", "scratch,pretrained"]) == 0
    assert json.loads((tmp_path / "report.json").read_text())["order_holds"] is True
    for bad in (["--expect-increasing", "scratch,pretrained"],         # equal is not an increase
                ["--expect-increasing", "pixels,finetuned", "--expect-increasing", "finetuned,pixels"],
                ["--expect-not-decreasing", "finetuned,scratch"]):
        (tmp_path / "report.md").unlink()
        capsys.readouterr()
        assert cli(args + bad) == 1, bad
        assert "does NOT hold" in (tmp_path / "report.md").read_text()
        assert "does not hold" in capsys.readouterr().err
        assert json.loads((tmp_path / "report.json").read_text())["order_holds"] is False
    assert cli(args + ["--expect-increasing", "pixels,nope"]) == 2  # an unknown row name is a clear error
    assert "nope" in capsys.readouterr().err


def test_grounding_rows_get_their_own_table_and_ordering(tmp_path, capsys):
    """Evaluations of GLIP runs (grounding_r1 ...) go in a grounding table beside the retrieval one;
    an expected ordering reads grounding R@1 there, and mixing the two kinds is refused."""
    retrieval = {k: 0.25 for k in METRICS}
    scores = {"untrained text": {"grounding_r1": 0.125, "grounding_r5": 0.5, "zero_shot_map": 0.0625,
                                 "zero_shot_map50": 0.25, "grounding_regions": 40.0, "zero_shot_classes": 9.0},
              "GLIP": {"grounding_r1": 0.375, "grounding_r5": 0.75, "grounding_regions": 40.0}}
    args = ["report", "--out", str(tmp_path / "report.md"), "--title", "GLIP demo"]
    for name, m in {"backbone + SoftTriple": retrieval, **scores}.items():
        d = tmp_path / name.replace(" ", "_")
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({**m, "shards": "data/x", "n_queries": 10, "n_classes": 5}))
        args += ["--row", f"{name}={d}"]
    assert cli(args + ["--expect-increasing", "untrained text,GLIP"]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "| backbone + SoftTriple | 25.0 | 25.0 | 25.0 | 25.0 | 25.0 | 25.0 |" in md
    assert "| untrained text | 12.5 | 50.0 | 6.2 | 25.0 |" in md and "| GLIP | 37.5 | 75.0 | n/a | n/a |" in md
    assert md.index("## Grounding") > md.index("| backbone + SoftTriple |")
    assert "untrained text: 40 regions, 9 prompted classes (data/x)" in md
    assert "Expected grounding R@1 ordering untrained text (12.5) < GLIP (37.5): **holds**" in md
    assert cli(args + ["--expect-increasing", "GLIP,untrained text"]) == 1
    assert cli(args + ["--expect-increasing", "backbone + SoftTriple,GLIP"]) == 2
    assert "mixes retrieval and grounding rows" in capsys.readouterr().err
    (tmp_path / "neither").mkdir()
    (tmp_path / "neither" / "metrics.json").write_text(json.dumps({"loss": 1.0}))
    assert cli(["report", "--out", str(tmp_path / "r2.md"), "--row", f"x={tmp_path / 'neither'}"]) == 2
    assert "neither retrieval (recall@1) nor grounding" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["", '{"recall@1": 0.', "[1, 2]"])
def test_a_broken_metrics_file_is_an_error_naming_it(tmp_path, capsys, text):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "metrics.json").write_text(text)
    assert cli(["report", "--out", str(tmp_path / "r.md"), "--row", f"x={tmp_path / 'e'}"]) == 2
    err = capsys.readouterr().err
    assert f"--row x: {tmp_path / 'e' / 'metrics.json'} is not a metrics.json" in err and "re-run `baton evaluate" in err
    assert not (tmp_path / "r.md").exists()
