"""benchmarks/gpu.sh's last step: the parts' JSON files -> OUT/gpu.json and the Markdown OUT/gpu.md.

Every part is in gpu.json under `parts`, with its exit status, wall time, limit and whether it
timed out, its rows as far as it got, and its notes; `complete` is true when every part ran to
its end with rows and no row failed, `problems` lists what is not. Exit status: 0 when complete.

    python benchmarks/gpu_report.py --out runs/gpu [--smoke] [--wall-s N]
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import PARTS  # noqa: E402

ALL_PARTS = ("tests", *PARTS)


def tests_summary(path: Path) -> dict:
    """Counts from pytest's junit XML (tests, failures, errors, skipped) and the skip reasons."""
    if not path.is_file():
        return {}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    reasons = sorted({s.get("message", "") for s in suite.iter("skipped")})
    failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "skip_reasons": reasons, "failed": failed}


def collect(out: Path) -> dict:
    parts, problems = {}, []
    for name in ALL_PARTS:
        status_file = out / "parts" / f"{name}.status.json"
        part = json.loads(status_file.read_text()) if status_file.is_file() else {"part": name, "rc": None,
                                                                                  "skipped": "not run"}
        data_file = out / "parts" / f"{name}.json"
        if data_file.is_file():
            part.update({k: v for k, v in json.loads(data_file.read_text()).items() if k != "part"})
        if name == "tests":
            part["tests"] = tests_summary(out / "parts" / "tests.xml")
        log = out / "parts" / f"{name}.log"
        if part.get("rc") not in (0, None) and log.is_file():
            part["log_tail"] = log.read_text(errors="replace")[-2000:]
        parts[name] = part
        if part.get("timed_out"):
            problems.append(f"{name}: timed out after {part.get('limit_s')} s (rows so far kept)")
        elif part.get("skipped"):
            problems.append(f"{name}: {part['skipped']}")
        elif part.get("rc") != 0:
            problems.append(f"{name}: exit status {part.get('rc')}")
        if name != "tests" and not part.get("skipped") and not part.get("rows"):
            problems.append(f"{name}: no rows")
        problems += [f"{name}: {r.get('model', r.get('program', ''))} {r.get('strategy', '')}: {r['error']}"
                     for r in part.get("rows", []) if "error" in r]
    return {"parts": parts, "problems": problems, "complete": not problems}


def _f(x, fmt: str = "{:.1f}", scale: float = 1.0) -> str:
    return "" if x is None else fmt.format(x * scale)


def markdown(report: dict) -> str:
    p = report["parts"]
    first = next((v for v in p.values() if v.get("device")), {})
    lines = [f"# baton on {first.get('device', '?')} ({'smoke: CPU, tiny models' if report['smoke'] else 'GPU'})",
             "", f"`bash benchmarks/gpu.sh{' --smoke' if report['smoke'] else ''}`, {report['wall_s']} s wall; torch "
             f"{first.get('torch', '?')}; peak {first.get('peak_tflops')} TFLOP/s ({first.get('peak_source', '')}). "
             "FLOPs: torch.utils.flop_counter.FlopCounterMode over one forward + backward (matmuls, convolutions, "
             "attention), MFU = FLOPs/sample x samples/s / peak. Memory: "
             f"{next((r.get('memory_kind') for v in p.values() for r in v.get('rows', []) if r.get('memory_kind')), '')}.",
             "", "| part | rows | exit | wall s | limit s | note |", "|---|---:|---:|---:|---:|---|"]
    for name, v in p.items():
        note = "timed out" if v.get("timed_out") else v.get("skipped", "")
        if name == "tests" and v.get("tests"):
            t = v["tests"]
            note = f"{t['passed']} passed, {t['skipped']} skipped, {t['failures'] + t['errors']} failed"
        lines.append(f"| {name} | {len(v.get('rows', []))} | {v.get('rc')} | {v.get('wall_s', '')} | "
                     f"{v.get('limit_s', '')} | {note} |")
    lines += ["", "| model | strategy | data | compile | batch | samples/s | step ms | peak GiB | TFLOP/s | MFU |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for name in ("clip_synthetic", "clip_compile", "clip_shards", "dino"):
        for r in p.get(name, {}).get("rows", []):
            if "error" in r:
                lines.append(f"| {r.get('model')} | {r.get('strategy')} | {r.get('data')} | {r.get('compile')} | | "
                             f"failed: {r['error'][:80]} | | | | |")
                continue
            lines.append(f"| {r['model']} | {r['strategy']} | {r['data']} | {'on' if r['compile'] else 'off'} | "
                         f"{r['batch']} | {_f(r['samples_per_s'])} | {_f(r['step_s'], scale=1e3)} | "
                         f"{_f(r['peak_memory_bytes'], '{:.2f}', 2 ** -30)} | {_f(r.get('achieved_tflops'), '{:.3g}')} | "
                         f"{_f(r.get('mfu'), '{:.1%}')} |")
    oc = p.get("open_clip_train", {})
    lines += ["", "| program (same model, batch, shards, workers) | samples/s | step ms |", "|---|---:|---:|"]
    for r in oc.get("rows", []):
        lines.append(f"| {r['program']} | {_f(r.get('samples_per_s'))} | {_f(r.get('step_s'), scale=1e3)} |"
                     if "error" not in r else f"| {r['program']} | failed: {r['error'][:80]} | |")
    lines.append(f"\nbaton / open_clip_train: {_f(oc.get('baton_over_open_clip_train'), '{:.2f}')}x")
    fa = p.get("faiss", {})
    lines += ["", "| faiss IndexFlatIP | n x d | queries | add s | search s | queries/s |", "|---|---|---:|---:|---:|---:|"]
    for r in fa.get("rows", []):
        lines.append(f"| {r['device']} | {r['n']} x {r['d']} | {r['nq']} | {_f(r['add_s'], '{:.2f}')} | "
                     f"{_f(r['search_s'], '{:.3f}')} | {_f(r['queries_per_s'], '{:.0f}')} |")
    lines += [f"\n{note}" for note in fa.get("notes", [])]
    lines += ["", "| decode (JPEG -> CLIP train transform) | on the device, samples/s | one CPU core, samples/s | "
              "step samples/s | CPU decode cores per GPU |", "|---|---:|---:|---:|---:|"]
    for r in p.get("decode", {}).get("rows", []):
        lines.append(f"| {r['what']} | {_f(r['device_decode_samples_per_s'], '{:.0f}')} | "
                     f"{_f(r['cpu_decode_samples_per_s_per_core'], '{:.0f}')} | {_f(r['step_samples_per_s'], '{:.0f}')} "
                     f"({r['step_rate_from']}) | {_f(r['cpu_decode_cores_per_gpu'])} |")
    if report["problems"]:
        lines += ["", "Problems:", *[f"- {x}" for x in report["problems"]]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--wall-s", type=int, default=None)
    args = ap.parse_args(argv)
    out = Path(args.out)
    report = {"smoke": args.smoke, "wall_s": args.wall_s, **collect(out)}
    (out / "gpu.json").write_text(json.dumps(report, indent=2))
    (out / "gpu.md").write_text(markdown(report))
    print((out / "gpu.md").read_text())
    return 0 if report["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
