"""COCO detection source: a COCO instances json (`instances_train2017.json`, LVIS, Objects365 in COCO
form) + its images -> grounding shards, detection as grounding as GLIP trains it.

Why: GLIP unifies detection and grounding by turning a label set into a text prompt: the class
names joined, each box pointing at its class's name in it. The prompt here is fixed, the same for
every image: the category names in ascending category `id` order (COCO's own order, the order
GLIP's `od_to_grounding` and its evaluation prompts use), each cleaned as GLIP's `clean_name`
does (a parenthesised part removed, `_` as a space), joined with ". " and ended with "." (the
ODVG source's `detection_prompt`): "person. bicycle. car. ...". A box's region is
`{"bbox": [x0, y0, x1, y1], "phrase": its class name, "tokens_positive": [that name's span]}`.
GLIP's training additionally shuffles and subsamples the names per image; a fixed prompt keeps the
shards deterministic (the loader may still vary them). A prompt longer than `glip.max_tokens`
tokens loses the boxes of the classes cut off (pretrain/glip/data.py): restrict the classes.

`--classes a,b` keeps only those classes (prompt and boxes), `--exclude-classes a,b` all others:
the two sides of a held-out class split (zero-shot detection of the held-out names). Names match
a category's `name` or its cleaned form. Crowd boxes (`iscrowd: 1`) are dropped as GLIP's COCO
training drops them. Besides the skips of `data_prep/coco_json.py`, per annotation:
`unknown_category` (a `category_id` no category has), `excluded_class` (left out by
--classes / --exclude-classes), `crowd_box`. An image with no box left is skipped (`no_regions`),
as GLIP's training set removes images without annotations.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Iterator

from baton.errors import BatonError
from baton.registry import unknown_name
from data_prep import options
from data_prep.coco_json import checked_box, grounding_item, image_entries, load_coco_json
from data_prep.items import Item
from data_prep.sources.odvg import detection_prompt
from data_prep.writer import Skip

NAME = "coco-detection"
HELP = "a COCO instances json + image folder -> grounding shards (class names joined into GLIP's prompt)"
KEYS = ("images", "annotations", "categories")


def clean_name(name: str) -> str:
    """GLIP's `clean_name`: "traffic_light" -> "traffic light", "bow (weapon)" -> "bow"."""
    name = re.sub(r"\(.*\)", "", name).replace("_", " ")
    return re.sub(r"\s+", " ", name).strip()


def category_names(categories: list, where: str) -> dict:
    """category id -> cleaned name, in ascending id order; BatonError for a malformed entry."""
    names = {}
    for n, c in enumerate(categories):
        if not isinstance(c, dict) or not isinstance(c.get("id"), (int, str)) or not isinstance(c.get("name"), str) \
                or not clean_name(c["name"]):
            raise BatonError(f"{where}: categories[{n}] needs an id and a non-empty name, got {c!r}")
        names[c["id"]] = (c["name"], clean_name(c["name"]))
    if not names:
        raise BatonError(f"{where}: no categories: nothing to prompt")
    return {k: names[k] for k in sorted(names, key=lambda k: (isinstance(k, str), k))}


def parse_names(text: str | None) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()] if text else []


def select_classes(names: dict, keep: list[str], drop: list[str], where: str) -> dict:
    """id -> cleaned name of the classes the prompt holds (all, `keep` only, or all but `drop`)."""
    if keep and drop:
        raise BatonError("pass --classes or --exclude-classes, not both")
    known = {}
    for raw, clean in names.values():
        known[raw], known[clean] = clean, clean
    for name in keep + drop:
        if name not in known:
            raise unknown_name(f"class (in {where})", name, sorted(set(known.values())))
    chosen = {known[n] for n in keep} if keep else {c for _, c in names.values()} - {known[n] for n in drop}
    if not chosen:
        raise BatonError(f"--exclude-classes leaves no class of {where} to prompt")
    return {k: clean for k, (_, clean) in names.items() if clean in chosen}


def iter_records(ann_file: Path, images: Path, keep: list[str] = (), drop: list[str] = (),
                 data: dict | None = None) -> Iterator[Item | Skip]:
    """One Item per `images` entry (json order) with an image and at least one kept box."""
    data = data if data is not None else load_coco_json(ann_file, KEYS)
    names = category_names(data["categories"], str(ann_file))
    classes = select_classes(names, list(keep), list(drop), str(ann_file))
    caption, spans = detection_prompt(list(dict.fromkeys(classes.values())))
    for walked in image_entries(data, ann_file, images):
        if isinstance(walked, Skip):
            yield walked
            continue
        where, entry, found, anns = walked
        regions = []
        for ann in anns:
            at = f"{where} annotation {ann.get('id', '?')}"
            category = ann.get("category_id")
            if not isinstance(category, (int, str)) or category not in names:
                yield Skip("unknown_category", f"{at}: category_id={category!r}")
                continue
            if category not in classes:
                yield Skip("excluded_class", at)
                continue
            if ann.get("iscrowd"):
                yield Skip("crowd_box", at)
                continue
            box = checked_box(ann.get("bbox"), *found[1])
            if isinstance(box, str):
                yield Skip(box, at)
                continue
            name = classes[category]
            regions.append({"bbox": box, "phrase": name, "tokens_positive": [spans[name]]})
        key = Path(entry["file_name"]).with_suffix("").as_posix()
        yield from grounding_item(key, found[0], found[1], caption, regions, entry, where)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("json", help="COCO instances json (images, annotations with bbox + category_id, categories)")
    p.add_argument("--images", required=True, help="folder the images' file_name are relative to (e.g. train2017/)")
    p.add_argument("--classes", default=None, metavar="A,B",
                   help="only these classes (comma-separated names): prompt and boxes")
    p.add_argument("--exclude-classes", default=None, metavar="A,B",
                   help="every class but these (the train side of a held-out split)")
    options.add_layout_arguments(p)


def run(args: argparse.Namespace) -> int:
    ann_file, images = Path(args.json), Path(args.images)
    if not images.is_dir():
        raise BatonError(f"--images {images} is not a folder (pass the folder the json's file_name are relative to)")
    data = load_coco_json(ann_file, KEYS)
    keep, drop = parse_names(args.classes), parse_names(args.exclude_classes)
    select_classes(category_names(data["categories"], str(ann_file)), keep, drop, str(ann_file))  # fail early
    options.run_source(lambda: iter_records(ann_file, images, keep, drop, data), args,
                       f"coco-detection: {ann_file} -> {args.out}", str(ann_file), layout_only=True)
    return 0
