"""MDETR source: MDETR's COCO-style grounding json (Flickr30k Entities, RefCOCO/+/g) + its images.

Why: MDETR's pre-processed annotations (`final_flickr_separateGT_train.json`,
`final_refcoco_train.json`, ..., the "mdetr_annotations" GLIP and mmdet also start from) are how
users usually hold these data sets. Each `images` entry is one (image, caption) pair:

    {"images": [{"id": 7, "file_name": "3359636318.jpg", "caption": "A man in a blue shirt ...",
                 "width": W, "height": H, ...}, ...],
     "annotations": [{"image_id": 7, "bbox": [x, y, w, h], "tokens_positive": [[2, 5], ...], ...}, ...]}

`bbox` is COCO's [x, y, w, h] in pixels, `tokens_positive` character spans into that entry's
caption. Each entry becomes one sample with the grounding record the ODVG source writes:
`{"caption", "regions": [{"bbox": [x0, y0, x1, y1], "phrase", "tokens_positive"}]}`, the phrase
being the caption's text at the spans joined by spaces (mmdet's goldg2odvg does the same), regions
in annotation order. The same image under several captions is one sample per caption
(key `<file stem>_<id>`). Besides the skips of `data_prep/coco_json.py`: `empty_caption`
(an entry without caption text), and per annotation `span_outside_caption` (a span that is not
0 <= start < end <= len(caption), or no span at all).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterator

from baton.errors import BatonError
from data_prep import options
from data_prep.coco_json import checked_box, checked_spans, grounding_item, image_entries, load_coco_json
from data_prep.items import Item
from data_prep.writer import Skip

NAME = "mdetr"
HELP = "MDETR's COCO-style grounding json (Flickr30k Entities, RefCOCO) + image folder -> grounding shards"


def regions_of(anns: list[dict], caption: str, size: tuple[int, int], where: str) -> Iterator[dict | Skip]:
    """The grounding regions of one caption's annotations, and a Skip for each unusable one."""
    for ann in anns:
        at = f"{where} annotation {ann.get('id', '?')}"
        box = checked_box(ann.get("bbox"), *size)
        if isinstance(box, str):
            yield Skip(box, at)
            continue
        spans = checked_spans(ann.get("tokens_positive"), caption)
        if spans is None:
            yield Skip("span_outside_caption", f"{at}: tokens_positive={ann.get('tokens_positive')!r}, "
                                               f"caption of {len(caption)} characters")
            continue
        yield {"bbox": box, "phrase": " ".join(caption[s:e] for s, e in spans), "tokens_positive": spans}


def iter_records(ann_file: Path, images: Path, data: dict | None = None) -> Iterator[Item | Skip]:
    """One Item per `images` entry (json order) with a usable caption, image and region
    (`data`: the json already loaded, else read from `ann_file`)."""
    data = data if data is not None else load_coco_json(ann_file, ("images", "annotations"))
    for walked in image_entries(data, ann_file, images):
        if isinstance(walked, Skip):
            yield walked
            continue
        where, entry, found, anns = walked
        caption = entry.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            yield Skip("empty_caption", where)
            continue
        regions = []
        for rec in regions_of(anns, caption, found[1], where):
            if isinstance(rec, Skip):
                yield rec
            else:
                regions.append(rec)
        key = f"{Path(entry['file_name']).with_suffix('').as_posix()}_{entry['id']}"
        yield from grounding_item(key, found[0], found[1], caption, regions, entry, where)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("json", help="MDETR's annotation json (final_flickr_separateGT_*.json, final_refcoco*.json, ...)")
    p.add_argument("--images", required=True, help="folder the entries' file_name are relative to "
                   "(flickr30k-images/, COCO's train2014/)")
    options.add_layout_arguments(p)


def run(args: argparse.Namespace) -> int:
    ann_file, images = Path(args.json), Path(args.images)
    if not images.is_dir():
        raise BatonError(f"--images {images} is not a folder (pass the folder the json's file_name are relative to)")
    data = load_coco_json(ann_file, ("images", "annotations"))   # fail early, before touching --out
    options.run_source(lambda: iter_records(ann_file, images, data), args, f"mdetr: {ann_file} -> {args.out}",
                       str(ann_file), layout_only=True)
    return 0
