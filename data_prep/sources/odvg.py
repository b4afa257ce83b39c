"""ODVG source: an ODVG jsonl (mmdet / Grounding DINO's detection + visual grounding records) + its images.

Why: ODVG is how grounding data (Flickr30k Entities, RefCOCO, GoldG, Objects365 converted by
mmdet's tools) usually reaches users, one json object per line:

    {"filename": "a.jpg", "height": H, "width": W,
     "grounding": {"caption": str, "regions": [{"bbox": [x0, y0, x1, y1], "phrase": str,
                                               "tokens_positive": [[start, end], ...]}, ...]}}
or  {"filename": ..., "detection": {"instances": [{"bbox": [...], "label": int, "category": str}, ...]}}

A grounding record is written as it is (baton's grounding record is ODVG's `grounding` field; see
`grounding_emoji.py`); a region without `tokens_positive` gets the first occurrence of its phrase.
A detection record becomes a grounding one as GLIP does for detection data: the prompt joins the
class names of the label map (`--label-map`, mmdet's {"label": "name"} json; else the records'
`category`) with ". ", and every box points at its class's name. Image bytes are copied
unchanged (png / jpg); a missing or other image, or a bad line, is skipped and counted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterator

from baton.errors import BatonError
from data_prep.job import write_shards
from data_prep.writer import Sample, Skip, print_summary

NAME = "odvg"
HELP = "an ODVG jsonl (grounding or detection records, mmdet's format) + image folder -> grounding shards"
EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"}


def detection_prompt(names: list[str]) -> tuple[str, dict[str, list[int]]]:
    """GLIP's detection prompt "cat. dog. traffic light." and each name's character span."""
    caption, spans = "", {}
    for name in names:
        spans[name] = [len(caption), len(caption) + len(name)]
        caption += f"{name}. "
    return caption.rstrip(), spans


def grounding_of(rec: dict, label_map: dict[str, str] | None) -> dict[str, Any] | None:
    """The grounding record {"caption", "regions"} of one ODVG line, or None if it has neither field."""
    if "grounding" in rec:
        g = rec["grounding"]
        caption, regions = g["caption"], []
        for r in g.get("regions", []):
            phrase = r["phrase"] if isinstance(r["phrase"], str) else " ".join(r["phrase"])
            spans = r.get("tokens_positive")
            if not spans:
                at = caption.find(phrase)
                if at < 0:
                    continue
                spans = [[at, at + len(phrase)]]
            regions.append({"bbox": [float(v) for v in r["bbox"]], "phrase": phrase,
                            "tokens_positive": [[int(s), int(e)] for s, e in spans]})
        return {"caption": caption, "regions": regions}
    if "detection" in rec:
        instances = rec["detection"].get("instances", [])
        names_of = {str(i["label"]): i.get("category") for i in instances}
        if label_map is not None:
            names_of = {str(k): v for k, v in label_map.items()}
        names = list(dict.fromkeys(v for v in names_of.values() if v))
        caption, spans = detection_prompt(names)
        regions = []
        for inst in instances:
            name = names_of.get(str(inst.get("label")))
            if name in spans:
                regions.append({"bbox": [float(v) for v in inst["bbox"]], "phrase": name,
                                "tokens_positive": [spans[name]]})
        return {"caption": caption, "regions": regions}
    return None


def iter_records(jsonl: Path, images: Path, label_map: dict[str, str] | None) -> Iterator[Sample | Skip]:
    with open(jsonl, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{jsonl}:{n}"
            try:
                rec = json.loads(line)
                record = grounding_of(rec, label_map)
                filename = rec["filename"]
            except (ValueError, KeyError, TypeError, AttributeError):
                yield Skip("bad_record", where)
                continue
            if record is None:
                yield Skip("no_grounding_or_detection", where)
                continue
            path = images / filename
            ext = EXTS.get(path.suffix.lower())
            if ext is None:
                yield Skip("unsupported_image", where)
                continue
            try:
                data = path.read_bytes()
            except OSError:
                yield Skip("missing_image", where)
                continue
            for key in ("width", "height"):
                if key in rec:
                    record[key] = rec[key]
            yield Sample(key=Path(filename).with_suffix("").as_posix(), image=data, ext=ext,
                         caption=record["caption"], meta=record)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("jsonl", help="the ODVG annotation file (one json object per line)")
    p.add_argument("--images", default=None, help="folder the records' filenames are relative to "
                   "(default: the jsonl's folder)")
    p.add_argument("--label-map", default=None, help="detection records: mmdet's label map json {label: name}")
    p.add_argument("--out", required=True, help="output folder of shards + stats.json")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")


def run(args: argparse.Namespace) -> int:
    jsonl = Path(args.jsonl)
    if not jsonl.is_file():
        raise BatonError(f"no ODVG jsonl at {jsonl}")
    label_map = None
    if args.label_map:
        try:
            label_map = json.loads(Path(args.label_map).read_text())
        except (OSError, ValueError) as e:
            raise BatonError(f"--label-map {args.label_map}: {e}") from None
    images = Path(args.images) if args.images else jsonl.parent
    stats = write_shards(iter_records(jsonl, images, label_map), Path(args.out), args.shard_size, log=sys.stdout)
    print_summary(stats, f"odvg: {jsonl} -> {args.out}")
    return 0
