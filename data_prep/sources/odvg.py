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
`category`) with ". ", and every box points at its class's name. Image bytes are kept unchanged
(PNG/JPEG; another format Pillow reads becomes PNG), never resized: the boxes are in pixels.

Every record is checked as the COCO-json sources check theirs (`data_prep/coco_json.py`), against
the image's real size read from its header, and the image is decoded fully by the shard workers.
Per line (the sample is skipped): `undecodable_record` (bytes that are not UTF-8), `bad_record` (not
a json object, no string `filename`, a `grounding` without a string `caption`),
`no_grounding_or_detection`, `missing_image`, `undecodable_image`, `size_mismatch` (the record's
`width`/`height` differ from the file's), `empty_caption`, `no_regions` (no region left). Per
region (the region is dropped, the sample kept; they count in `inputs`): `bad_annotation` (no
`bbox` of four finite numbers, or no phrase), `empty_box` (x1 <= x0 or y1 <= y0),
`box_outside_image` (more than 1 pixel past a border; within that, clipped), `span_outside_caption`
(a `tokens_positive` span that is not two integers inside the caption, or a phrase without spans
that the caption does not contain), `unknown_category` (a detection label the prompt has no name for).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Iterator

from baton.errors import BatonError
from data_prep import options
from data_prep.coco_json import ImageSizes, checked_corners, checked_spans, sized_image
from data_prep.items import Item
from data_prep.writer import Skip

NAME = "odvg"
HELP = "an ODVG jsonl (grounding or detection records, mmdet's format) + image folder -> grounding shards"


def detection_prompt(names: list[str]) -> tuple[str, dict[str, list[int]]]:
    """GLIP's detection prompt "cat. dog. traffic light." and each name's character span."""
    caption, spans = "", {}
    for name in names:
        spans[name] = [len(caption), len(caption) + len(name)]
        caption += f"{name}. "
    return caption.rstrip(), spans


class BadRecord(ValueError):
    """A line whose record cannot be read at all (skipped as `bad_record`)."""


def grounding_regions(g: Any) -> tuple[str, list[tuple[Any, str, Any]]]:
    """(caption, [(bbox, phrase, tokens_positive or None), ...]) of an ODVG `grounding` field."""
    if not isinstance(g, dict) or not isinstance(g.get("caption"), str):
        raise BadRecord("grounding needs a caption string")
    regions = g.get("regions", [])
    if not isinstance(regions, list):
        raise BadRecord("grounding regions must be a list")
    out = []
    for r in regions:
        r = r if isinstance(r, dict) else {}
        phrase = r.get("phrase")
        if isinstance(phrase, list) and all(isinstance(p, str) for p in phrase):
            phrase = " ".join(phrase)
        out.append((r.get("bbox"), phrase if isinstance(phrase, str) else None, r.get("tokens_positive")))
    return g["caption"], out


def detection_regions(d: Any, label_map: dict[str, str] | None) -> tuple[str, list[tuple[Any, str, Any]]]:
    """The prompt of the class names and (bbox, name or None, its span) per instance."""
    instances = d.get("instances", []) if isinstance(d, dict) else None
    if not isinstance(instances, list):
        raise BadRecord("detection instances must be a list")
    instances = [i if isinstance(i, dict) else {} for i in instances]
    if label_map is not None:
        names_of = dict(label_map)
    else:
        names_of = {str(i.get("label")): i["category"] for i in instances
                    if isinstance(i.get("category"), str) and i["category"].strip()}
    caption, spans = detection_prompt(list(dict.fromkeys(names_of.values())))
    out = []
    for inst in instances:
        name = names_of.get(str(inst.get("label")))
        out.append((inst.get("bbox"), name, [spans[name]] if name in spans else "unknown_category"))
    return caption, out


def checked_regions(caption: str, raw: list, size: tuple[int, int], where: str) -> Iterator[dict | Skip]:
    """Baton's regions of one record, each box and span checked; a Skip for each unusable one."""
    for n, (bbox, phrase, spans) in enumerate(raw):
        at = f"{where} region {n}"
        if spans == "unknown_category":
            yield Skip("unknown_category", at)
            continue
        box = checked_corners(bbox, *size) if phrase is not None else "bad_annotation"
        if isinstance(box, str):
            yield Skip(box, f"{at}: bbox={bbox!r} on a {size[0]}x{size[1]} image")
            continue
        if not spans and phrase:            # no tokens_positive: the phrase's first occurrence
            at_char = caption.find(phrase)
            spans = [[at_char, at_char + len(phrase)]] if at_char >= 0 else None
        checked = checked_spans(spans, caption)
        if checked is None:
            yield Skip("span_outside_caption", f"{at}: tokens_positive={spans!r}, phrase={phrase!r}, "
                                               f"caption of {len(caption)} characters")
            continue
        yield {"bbox": box, "phrase": phrase, "tokens_positive": checked}


def parse_line(raw: bytes, label_map: dict[str, str] | None) -> tuple[dict, str, list] | str:
    """(record, caption, raw regions) of one jsonl line, or the skip reason."""
    try:
        rec = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return "undecodable_record"
    except ValueError:
        return "bad_record"
    if not isinstance(rec, dict) or not isinstance(rec.get("filename"), str) or not rec["filename"]:
        return "bad_record"
    try:
        if "grounding" in rec:
            return (rec, *grounding_regions(rec["grounding"]))
        if "detection" in rec:
            return (rec, *detection_regions(rec["detection"], label_map))
    except BadRecord:
        return "bad_record"
    return "no_grounding_or_detection"


def iter_records(jsonl: Path, images: Path, label_map: dict[str, str] | None) -> Iterator[Item | Skip]:
    """One Item per line (file order) with a caption, a readable image and a usable region."""
    sizes = ImageSizes()
    with open(jsonl, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{jsonl}:{n}"
            parsed = parse_line(line, label_map)
            if isinstance(parsed, str):
                yield Skip(parsed, where)
                continue
            rec, caption, raw = parsed
            path = images / rec["filename"]
            size = sized_image(path, (rec.get("width"), rec.get("height")), sizes, where)
            if isinstance(size, Skip):
                yield size
                continue
            if not caption.strip():
                yield Skip("empty_caption", where)
                continue
            regions = []
            for region in checked_regions(caption, raw, size, where):
                if isinstance(region, Skip):
                    yield region
                else:
                    regions.append(region)
            if not regions:
                yield Skip("no_regions", where)
                continue
            meta = {"caption": caption, "regions": regions, "width": size[0], "height": size[1],
                    "source": rec["filename"]}
            yield Item(key=Path(rec["filename"]).with_suffix("").as_posix(), caption=caption, meta=meta,
                       source=str(path))


def read_label_map(path: str) -> dict[str, str]:
    """mmdet's label map {label: name}; BatonError naming the file unless every name is a string."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BatonError(f"--label-map {path}: {e}") from None
    if not isinstance(data, dict) or not data or \
            not all(isinstance(v, str) and v.strip() for v in data.values()):
        raise BatonError(f"--label-map {path}: expected a json object {{label: class name}} with non-empty "
                         f"names (mmdet's label map), got {str(data)[:80]}")
    return {str(k): v for k, v in data.items()}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("jsonl", help="the ODVG annotation file (one json object per line)")
    p.add_argument("--images", default=None, help="folder the records' filenames are relative to "
                   "(default: the jsonl's folder)")
    p.add_argument("--label-map", default=None, help="detection records: mmdet's label map json {label: name}")
    options.add_layout_arguments(p)


def run(args: argparse.Namespace) -> int:
    jsonl = Path(args.jsonl)
    if not jsonl.is_file():
        raise BatonError(f"no ODVG jsonl at {jsonl}")
    label_map = read_label_map(args.label_map) if args.label_map else None
    images = Path(args.images) if args.images else jsonl.parent
    if not images.is_dir():
        raise BatonError(f"--images {images} is not a folder (pass the folder the records' filenames are relative to)")
    options.run_source(lambda: iter_records(jsonl, images, label_map), args, f"odvg: {jsonl} -> {args.out}",
                       str(jsonl), layout_only=True)
    return 0
