"""A generated corpus of bad inputs, each with what baton must make of it.

`write_class_folders(root)` writes ROOT/<class>/<files>: good images and, among them, every kind
of bad image file below; `BAD_FILES` maps each bad file to the reason `baton shards` and
finetuning's file sources count it under (`data_prep.images`' reasons). `write_bad_shards(dir)`
writes WebDataset shards holding good samples and every kind of bad sample; `BAD_SAMPLES` maps
each to the reason the shard readers count. The tests (tests/test_fault_injection.py) run every
stage over them: each bad input is skipped with its reason counted, or refused with a message
naming it, never a traceback, a hang or a count that is silently wrong.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def png_bytes(seed: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(seed: int, size: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(side: int = 200_000) -> bytes:
    """A valid PNG header claiming side x side pixels (40 G at the default) with one tiny IDAT:
    what a decompression bomb looks like to a decoder that trusts the header."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _chunk(b"IEND", b""))


# file name -> reason it is skipped under (by `baton shards folder` and finetuning's file sources)
BAD_FILES = {
    "truncated.png": "undecodable_image",       # cut in the middle of its image data
    "truncated.jpg": "undecodable_image",
    "empty.png": "undecodable_image",           # zero bytes
    "text.jpg": "undecodable_image",            # not an image, named as one
    "bomb.png": "undecodable_image",            # a header of 40 G pixels
    "fifo.png": "not_a_file",                   # opening it would wait for a writer forever
    "loop.png": "unreadable_file",              # a symlink to itself (ELOOP)
    "dangling.png": "missing_file",             # a symlink to nothing
}
# files that are fine, though odd: a PNG named .jpg decodes (Pillow reads the content, not the name)
ODD_BUT_GOOD = {"png_named.jpg"}
# a directory named as an image: structure, not an input (both readers look past it)
IGNORED = {"folder.png"}
UNREADABLE = "locked.png"   # mode 000: unreadable_file, except for root (who reads it: a good image)


def write_class_folders(root: Path, classes: int = 4, per_class: int = 6, bad_class: str = "c0") -> dict:
    """Good images c<k>/<i>.png, and in `bad_class` every file of BAD_FILES, ODD_BUT_GOOD and
    UNREADABLE. Returns {"good": n good files, "bad": {reason: count}} as baton must count them."""
    good = 0
    for c in range(classes):
        d = root / f"c{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (d / f"{i}.png").write_bytes(png_bytes(100 * c + i))
            good += 1
    d = root / bad_class
    whole = png_bytes(7, size=64)
    (d / "truncated.png").write_bytes(whole[: len(whole) // 2])
    whole_jpeg = jpeg_bytes(8, size=64)
    (d / "truncated.jpg").write_bytes(whole_jpeg[: len(whole_jpeg) // 2])
    (d / "empty.png").write_bytes(b"")
    (d / "text.jpg").write_text("this is not an image\n")
    (d / "bomb.png").write_bytes(bomb_png())
    os.mkfifo(d / "fifo.png")
    (d / "folder.png").mkdir()
    os.symlink("loop.png", d / "loop.png")
    os.symlink("nowhere.png", d / "dangling.png")
    (d / "png_named.jpg").write_bytes(png_bytes(9))
    good += 1
    (d / UNREADABLE).write_bytes(png_bytes(10))
    os.chmod(d / UNREADABLE, 0)
    bad: dict[str, int] = {}
    for reason in BAD_FILES.values():
        bad[reason] = bad.get(reason, 0) + 1
    if os.geteuid() == 0:
        good += 1
    else:
        bad["unreadable_file"] = bad.get("unreadable_file", 0) + 1
    return {"good": good, "bad": bad}


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            t.addfile(info, io.BytesIO(data))


def labelled(key: str, seed: int, name: str) -> list[tuple[str, bytes]]:
    return [(f"{key}.png", png_bytes(seed)), (f"{key}.txt", f"a {name}".encode()),
            (f"{key}.json", json.dumps({"class": name}).encode())]


# sample -> the reason it is skipped under by (finetuning's reader: a class required, no caption;
# pretraining's held-out CLIP evaluation: a caption required, the class from json or caption);
# None: kept by that reader
BAD_SAMPLES = {
    "bad_image": ("bad_image", "bad_image"),           # image bytes that do not decode
    "no_image": ("missing_image", "missing_image"),    # a caption and a json, no image
    "bad_json": ("bad_json", "bad_json"),              # json that does not parse
    "no_class": ("missing_class", None),               # json without "class"
    "dup": ("duplicate_key", "duplicate_key"),         # the key of an earlier sample again
    "latin1": (None, "bad_caption"),                   # a caption that is not UTF-8
}


def write_bad_shards(out: Path, good_per_shard: int = 12) -> dict:
    """shard-000000.tar: good samples and one of each of BAD_SAMPLES; shard-000001.tar: good
    samples, cut inside the image of its sample `good_per_shard // 2` (`unreadable_shard`: the
    samples from there on are lost, counted against the limit through stats.json's count).
    Returns {"good_per_shard": n, "read_before_cut": samples of the cut shard still read}."""
    cut = good_per_shard // 2
    out.mkdir(parents=True, exist_ok=True)
    names = ["red circle", "blue square", "green cross", "yellow triangle"]
    first = [m for i in range(good_per_shard) for m in labelled(f"a{i:03d}", i, names[i % 4])]
    first += [("bad_image.png", b"\x89PNG broken"), ("bad_image.txt", b"a red circle"),
              ("bad_image.json", b'{"class": "red circle"}'),
              ("no_image.txt", b"a red circle"), ("no_image.json", b'{"class": "red circle"}'),
              ("bad_json.png", png_bytes(50)), ("bad_json.txt", b"a red circle"), ("bad_json.json", b"{nope"),
              ("no_class.png", png_bytes(51)), ("no_class.txt", b"a red circle"), ("no_class.json", b'{"design": 1}'),
              ("a000.png", png_bytes(52)), ("a000.txt", b"a red circle"), ("a000.json", b'{"class": "red circle"}'),
              ("latin1.png", png_bytes(53)), ("latin1.txt", "a caf\u00e9".encode("latin-1")),
              ("latin1.json", b'{"class": "red circle"}')]
    _tar(out / "shard-000000.tar", first)
    second = [m for i in range(good_per_shard) for m in labelled(f"b{i:03d}", 100 + i, names[i % 4])]
    _tar(out / "shard-000001.tar", second)
    with tarfile.open(out / "shard-000001.tar") as t:   # cut inside the image of sample `cut`
        offset = t.getmembers()[3 * cut].offset_data + 10
    whole = (out / "shard-000001.tar").read_bytes()
    (out / "shard-000001.tar").write_bytes(whole[:offset])
    shards = [{"name": "shard-000000.tar", "count": good_per_shard + len(BAD_SAMPLES)},
              {"name": "shard-000001.tar", "count": good_per_shard}]
    (out / "stats.json").write_text(json.dumps({"num_samples": sum(s["count"] for s in shards), "shards": shards}))
    return {"good_per_shard": good_per_shard, "read_before_cut": cut}
