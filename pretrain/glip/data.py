"""Grounding samples -> tensors: the image resized, the caption tokenised, boxes and the positive map.

A grounding record (`data_prep/sources/grounding_emoji.py` documents the format) gives boxes in
pixels and, per box, character spans of its phrase in the caption. The positive map says which
tokens each box's phrase covers: token i is positive for a box when its character offsets overlap
one of the box's spans (special and padding tokens have no characters and are never positive).
That is how GLIP turns spans into token targets (`create_positive_map`), via the fast tokenizer's
offset mapping. A box whose phrase was cut off by `glip.max_tokens` has no token left and is
dropped; boxes beyond `glip.max_regions` are dropped (the loader stacks fixed shapes).

Each region is checked (`checked_regions`): a box that is not four finite numbers, or spans that are
not [start, end] integer pairs, reject the sample (`bad_json`: the record is broken, not one box);
a box is clipped to the image and dropped when nothing of it is left (past the image, no area, or
swapped corners), as GLIP's loader clips (`BoxList.clip_to_image(remove_empty=True)`).

Per sample: (image, input_ids (L,), attention_mask (L,), boxes (R, 4) float pixels at
glip.image_size, box_valid (R,), positive_map (R, L)). The image is a uint8 tensor, normalised by
the loader's workers (`row_normalize`) or on the device, as the method places it (as DINO's crops).
"""

from __future__ import annotations

from typing import Any

import math

import torch
from torchvision import transforms as T

from pretrain.data import Rejected, decode_image
from pretrain.data.labelled import grounding_record
from pretrain.data.uint8_images import BatchNormalize
from pretrain.glip.config import GlipConfig


def positive_map_of(offsets: list[tuple[int, int]], spans_per_box: list[list[list[int]]], length: int) -> torch.Tensor:
    """(boxes, length) 0/1 map: token i of `offsets` (char (start, end); (0, 0) for special tokens)
    overlaps one of the box's character spans [start, end)."""
    out = torch.zeros(len(spans_per_box), length)
    for r, spans in enumerate(spans_per_box):
        for i, (s, e) in enumerate(offsets[:length]):
            if e > s and any(s < b and e > a for a, b in spans):
                out[r, i] = 1.0
    return out


def checked_regions(regions: list, width: int, height: int) -> list[tuple[list[float], list[list[int]], Any]]:
    """(box clipped to the width x height image, spans, phrase) of each region with a box left; Rejected
    (bad_json) naming the region when one is malformed (see the module's docstring)."""
    out = []
    for n, r in enumerate(regions):
        try:
            box = [float(v) for v in r["bbox"]]
            spans = [list(s) for s in r["tokens_positive"]]
        except (KeyError, TypeError, ValueError) as e:
            raise Rejected("bad_json", f"region {n} lacks a bbox/tokens_positive list: {e!r}") from None
        if len(box) != 4 or not all(math.isfinite(v) for v in box):
            raise Rejected("bad_json", f"region {n}: bbox {r['bbox']!r} is not four finite numbers")
        if not all(len(s) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in s) for s in spans):
            raise Rejected("bad_json", f"region {n}: tokens_positive {r['tokens_positive']!r} is not "
                                       f"[[start, end], ...] of integers")
        x0, y0 = max(box[0], 0.0), max(box[1], 0.0)
        x1, y1 = min(box[2], float(width)), min(box[3], float(height))
        if x1 > x0 and y1 > y0:
            out.append(([x0, y0, x1, y1], spans, r.get("phrase")))
    return out


class GroundingSample:
    """(raw webdataset sample, seed) -> the tensors above, or `Rejected` (bad_json for a record
    without caption/regions, missing_caption for an empty caption, bad_image)."""

    def __init__(self, cfg: GlipConfig, tokenizer: Any):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.resize = T.Compose([T.Resize((cfg.image_size, cfg.image_size), antialias=True), T.PILToTensor()])
        self.batch_normalize = BatchNormalize(cfg.mean, cfg.std)
        self.row_normalize: BatchNormalize | None = None

    def record(self, sample: dict) -> dict:
        return grounding_record(sample["json"])   # the check the shared shard reader makes

    def encode(self, caption: str, regions: list[dict], size: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        """Token ids, mask, boxes, valid and positive map of one caption and its regions on an image of
        `size` (width, height) pixels, the boxes scaled to glip.image_size."""
        cfg = self.cfg
        enc = self.tokenizer(caption, padding="max_length", truncation=True, max_length=cfg.max_tokens,
                             return_offsets_mapping=True)
        ids = torch.tensor(enc["input_ids"], dtype=torch.long)
        mask = torch.tensor(enc["attention_mask"], dtype=torch.long)
        found = checked_regions(regions, *size)
        pmap = positive_map_of(enc["offset_mapping"], [spans for _, spans, _ in found], cfg.max_tokens)
        sx, sy = cfg.image_size / size[0], cfg.image_size / size[1]
        keep = [r for r in range(len(found)) if pmap[r].any()][:cfg.max_regions]
        boxes = torch.zeros(cfg.max_regions, 4)
        valid = torch.zeros(cfg.max_regions)
        positive = torch.zeros(cfg.max_regions, cfg.max_tokens)
        for j, r in enumerate(keep):
            x0, y0, x1, y1 = found[r][0]
            boxes[j] = torch.tensor([x0 * sx, y0 * sy, x1 * sx, y1 * sy])
            valid[j] = 1.0
            positive[j] = pmap[r]
        return ids, mask, boxes, valid, positive

    def __call__(self, sample: dict[str, Any], seed: int) -> tuple[torch.Tensor, ...]:
        if "json" not in sample:
            raise Rejected("bad_json", "no grounding record (key.json)")
        rec = self.record(sample)
        image = decode_image(sample)
        return (self.resize(image), *self.encode(rec["caption"], rec["regions"], image.size))

    def objects(self, sample: dict[str, Any]) -> tuple[torch.Tensor, list[tuple[str, list[float]]]]:
        """(uint8 image at glip.image_size, [(phrase, box scaled to it), ...] of every region): what
        zero-shot detection scores, whatever the caption's length (`pretrain.glip.detection`)."""
        if "json" not in sample:
            raise Rejected("bad_json", "no grounding record (key.json)")
        rec = self.record(sample)
        image = decode_image(sample)
        sx, sy = self.cfg.image_size / image.width, self.cfg.image_size / image.height
        found = checked_regions(rec["regions"], *image.size)
        if not all(isinstance(phrase, str) and phrase.strip() for _, _, phrase in found):
            raise Rejected("bad_json", "a region's phrase is not a non-empty string")
        return self.resize(image), [(phrase, [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy])
                                    for box, _, phrase in found]
