"""What the COCO-json grounding sources share (`mdetr`, `coco-detection`): reading the json, image
sizes, COCO boxes -> checked pixel boxes, and the plan item of one grounding sample (the `odvg`
source uses the box, span and image-size checks too).

Why shared: MDETR's annotations (Flickr30k Entities, RefCOCO/+/g) and COCO's instances files are the
same container (`images`, `annotations` with `image_id` and `bbox` [x, y, w, h] in pixels); only how
a caption and its spans are made differs, and that lives in each source's file.

Boxes are checked against the image's real size, read from its header while planning (cheap: no
pixels), because a box is only meaningful on the pixels it was drawn on. The shard workers then
decode every image fully (`data_prep.items.process_item` with the default options, which keep
PNG/JPEG bytes unchanged and never resize, so the pixel boxes stay valid).

Per-annotation skips, counted under their reason (they drop the region, not the sample):
`missing_image_id` (no image has the annotation's `image_id`), `bad_annotation` (no usable
`bbox`, not four finite numbers), `empty_box` (width or height <= 0; for the [x0, y0, x1, y1] boxes of
the ODVG source, `checked_corners`: x1 <= x0 or y1 <= y0), `box_outside_image` (more than
`BOX_TOLERANCE` pixels past an image border; a box within it is clipped to the image, as COCO's
own rounding leaves some boxes a fraction of a pixel past the border).
Per-image skips: `bad_image_entry` (no `file_name` / `id`), `missing_image` (no such file),
`undecodable_image` (Pillow cannot read its header here, or decode it fully in a worker),
`size_mismatch` (the json's `width`/`height` differ from the file's: the boxes were drawn on
another size), `no_regions` (no region left: nothing to ground or detect).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from baton.errors import BatonError
from data_prep.items import Item
from data_prep.writer import Skip

BOX_TOLERANCE = 1.0   # pixels a box may pass a border by and still be kept (clipped)


def load_coco_json(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """The json object of `path` with each of `keys` a list; BatonError naming the file and key."""
    if not path.is_file():
        raise BatonError(f"no annotation json at {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BatonError(f"{path} is not a readable json file: {e}") from None
    if not isinstance(data, dict):
        raise BatonError(f"{path}: expected a json object with {', '.join(keys)}, got a {type(data).__name__}")
    for key in keys:
        if not isinstance(data.get(key), list):
            raise BatonError(f"{path}: no list under {key!r}; pass a COCO-style json "
                             f"({', '.join(keys)}: MDETR's final_*.json or COCO's instances_*.json)")
    return data


def image_ids(images: list) -> set:
    """The ids of the `images` entries (hashable ones; a bad entry is skipped when its turn comes)."""
    return {e["id"] for e in images if isinstance(e, dict) and isinstance(e.get("id"), (int, str))}


def annotations_by_image(annotations: list, image_ids: set, where: str) -> tuple[dict[Any, list], list[Skip]]:
    """image id -> its annotations (json order); Skips for annotations naming no known image."""
    by_image: dict[Any, list] = defaultdict(list)
    skips = []
    for n, ann in enumerate(annotations):
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if not isinstance(image_id, (int, str)) or image_id not in image_ids:
            skips.append(Skip("missing_image_id", f"{where}: annotations[{n}] image_id={image_id!r}"))
            continue
        by_image[image_id].append(ann)
    return by_image, skips


class ImageSizes:
    """(width, height) of image files from their headers, or the skip reason; cached, since MDETR
    lists one image once per caption."""

    def __init__(self) -> None:
        self._sizes: dict[Path, tuple[int, int] | str] = {}

    def __call__(self, path: Path) -> tuple[int, int] | str:
        if path not in self._sizes:
            self._sizes[path] = self._read(path)
        return self._sizes[path]

    @staticmethod
    def _read(path: Path) -> tuple[int, int] | str:
        if not path.is_file():
            return "missing_image"
        try:
            with Image.open(path) as img:
                size = img.size
        except Exception:   # Pillow raises many types (UnidentifiedImageError, OSError, SyntaxError...)
            return "undecodable_image"
        return size if size[0] > 0 and size[1] > 0 else "undecodable_image"


def checked_box(bbox: Any, width: int, height: int) -> list[float] | str:
    """COCO [x, y, w, h] -> [x0, y0, x1, y1] inside the image, or the skip reason."""
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return "bad_annotation"
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return "bad_annotation"
    if w <= 0 or h <= 0:
        return "empty_box"
    return checked_corners([x, y, x + w, y + h], width, height)


def checked_corners(bbox: Any, width: int, height: int) -> list[float] | str:
    """[x0, y0, x1, y1] pixels (ODVG's and baton's box) inside the image, or the skip reason:
    `bad_annotation` (not four finite numbers), `empty_box` (x1 <= x0 or y1 <= y0: no area, or
    the corners swapped), `box_outside_image` (as `checked_box`; within the tolerance: clipped)."""
    try:
        x0, y0, x1, y1 = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return "bad_annotation"
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return "bad_annotation"
    if x1 <= x0 or y1 <= y0:
        return "empty_box"
    if x0 < -BOX_TOLERANCE or y0 < -BOX_TOLERANCE or x1 > width + BOX_TOLERANCE or y1 > height + BOX_TOLERANCE:
        return "box_outside_image"
    x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
    if x1 <= x0 or y1 <= y0:   # only the tolerance band was inside
        return "box_outside_image"
    return [x0, y0, x1, y1]


def checked_spans(spans: object, caption: str) -> list[list[int]] | None:
    """`tokens_positive` as [[start, end], ...] of integers with 0 <= start < end <= len(caption),
    or None (no span, a span that is not two integers, or one outside the caption)."""
    if not isinstance(spans, list) or not spans:
        return None
    out = []
    for span in spans:
        if not isinstance(span, (list, tuple)) or len(span) != 2 or \
                not all(isinstance(v, int) and not isinstance(v, bool) for v in span):
            return None
        start, end = span
        if not 0 <= start < end <= len(caption):
            return None
        out.append([start, end])
    return out


def sized_image(path: Path, declared: tuple[Any, Any], sizes: ImageSizes, where: str) -> tuple[int, int] | Skip:
    """The real (width, height) of `path`, or the Skip of the whole sample: missing, undecodable, or
    `size_mismatch` when the annotation declares another size (`declared`: (None, None) if not)."""
    size = sizes(path)
    if isinstance(size, str):
        return Skip(size, f"{where}: {path}")
    if None not in declared and tuple(declared) != size:
        return Skip("size_mismatch", f"{where}: {path} is {size[0]}x{size[1]}, the json says "
                                     f"{declared[0]}x{declared[1]}")
    return size


def image_of(entry: Any, images: Path, sizes: ImageSizes, where: str) -> tuple[Path, tuple[int, int]] | Skip:
    """The file and real size of one `images` entry, or the Skip of the whole sample."""
    if (not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str)
            or not isinstance(entry.get("id"), (int, str))):
        return Skip("bad_image_entry", where)
    path = images / entry["file_name"]
    size = sized_image(path, (entry.get("width"), entry.get("height")), sizes, where)
    return size if isinstance(size, Skip) else (path, size)


def image_entries(data: dict, ann_file: Path, images: Path) -> Iterator[tuple | Skip]:
    """What both COCO-json sources walk: the annotations' skips, then per `images` entry (json
    order) either its Skip (bad entry, missing/undecodable/mis-sized image, a repeated id) or
    (where, entry, (path, size), its annotations)."""
    by_image, skips = annotations_by_image(data["annotations"], image_ids(data["images"]), str(ann_file))
    yield from skips
    sizes, seen = ImageSizes(), set()
    for n, entry in enumerate(data["images"]):
        where = f"{ann_file}: images[{n}]"
        found = image_of(entry, images, sizes, where)
        if isinstance(found, Skip):
            yield found
            continue
        if entry["id"] in seen:
            yield Skip("duplicate_image_id", f"{where}: id {entry['id']!r}")
            continue
        seen.add(entry["id"])
        yield where, entry, found, by_image.get(entry["id"], [])


def grounding_item(key: str, path: Path, size: tuple[int, int], caption: str, regions: list[dict],
                   entry: dict, where: str) -> Iterator[Item | Skip]:
    """The plan item of one grounding sample (`key.json` = the grounding record, as the ODVG source
    writes it, plus the image's size, id and file), or `no_regions`."""
    if not regions:
        yield Skip("no_regions", where)
        return
    meta = {"caption": caption, "regions": regions, "width": size[0], "height": size[1],
            "image_id": entry["id"], "source": entry["file_name"]}
    yield Item(key=key, caption=caption, meta=meta, source=str(path))
