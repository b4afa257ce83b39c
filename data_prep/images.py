"""Image checks and conversions shared by the sources.

A shard must only hold images the trainer can decode, so every input is fully decoded with
Pillow (`open` + `load`, not just `verify`, which misses truncated data) before it is written.
Problems become `SkipSample(reason)`: the writer counts them by reason instead of failing the run.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from baton.images import rgb_on_white

# Extensions tried as images by the folder source; anything else is skipped and counted.
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Formats whose original bytes can go into a shard unchanged (as `png` / `jpg`).
PASSTHROUGH = {"PNG": "png", "JPEG": "jpg"}


class SkipSample(Exception):
    """An input that cannot become a sample; `reason` is the stats.json counter it goes to."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def read_bytes(path: str | os.PathLike) -> bytes:
    """The file's bytes, or SkipSample('missing_file' / 'not_a_file' / 'unreadable_file').

    Only regular files are read: opening a FIFO (or a character device) would block for good, so
    anything else is skipped as 'not_a_file' before it is opened."""
    p = Path(path)
    try:
        if not stat.S_ISREG(os.stat(p).st_mode):
            raise SkipSample("not_a_file", f"{p} is not a regular file (a FIFO, socket, device or folder)")
        return p.read_bytes()
    except FileNotFoundError:
        raise SkipSample("missing_file", str(p)) from None
    except IsADirectoryError:
        raise SkipSample("not_a_file", str(p)) from None
    except OSError as e:
        raise SkipSample("unreadable_file", f"{p}: {e}") from None
    except ValueError as e:   # a NUL byte in the path (a table cell, say): no file can have that name
        raise SkipSample("unreadable_file", f"{str(p)!r}: {e}") from None


def decode(data: bytes, where: str = "", draft: bool = False) -> Image.Image:
    """Fully decode `data`; raise SkipSample('undecodable_image') on any decoder complaint.

    Decompression-bomb warnings are promoted to errors: a huge image would stall training.
    `draft`: a JPEG is decoded at 1/8 scale (libjpeg's DCT scaling), for checking a file whose
    pixels are not kept: every byte of its entropy-coded data is still read, so a truncated or
    corrupt file fails as in a full decode, at a fraction of the cost.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if draft and img.format == "JPEG":
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except Exception as e:  # Pillow raises many types: UnidentifiedImageError, OSError, SyntaxError...
        raise SkipSample("undecodable_image", f"{where}: {type(e).__name__}: {e}") from None
    if img.width < 1 or img.height < 1:
        raise SkipSample("undecodable_image", f"{where}: empty image")
    return img


def encode_png(img: Image.Image) -> bytes:
    """PNG bytes with no metadata, so equal pixels give equal bytes (reproducible shards)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def resize_short_side(img: Image.Image, size: int) -> Image.Image:
    """Scale so the shorter side is `size`, keeping the aspect ratio (the loader crops later)."""
    w, h = img.size
    scale = size / min(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img if new == img.size else img.resize(new, Image.Resampling.BICUBIC)


def resize_max_side(img: Image.Image, max_side: int) -> Image.Image:
    """Scale down so the longer side is at most `max_side`, keeping the aspect ratio (never up)."""
    w, h = img.size
    if max(w, h) <= max_side:
        return img
    scale = max_side / max(w, h)
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    """Baseline JPEG without metadata: equal pixels and quality give equal bytes."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False)
    return buf.getvalue()


@dataclass(frozen=True)
class ImageOptions:
    """What happens to an image on its way into a shard (`baton shards` options).

    size: shorter side scaled to `size` (up or down); max_side: longer side scaled down to at most
    `max_side` (never up); min_size: images whose shorter side is below it are skipped as
    `too_small`; jpeg_quality: re-encode every image as JPEG at this quality. Without any of
    these, PNG and JPEG keep their original bytes. A re-encoded image is PNG unless jpeg_quality.
    """

    size: int | None = None
    max_side: int | None = None
    min_size: int | None = None
    jpeg_quality: int | None = None


def prepare_image(data: bytes, where: str, opts: ImageOptions = ImageOptions()) -> tuple[bytes, str]:
    """(bytes, 'png'|'jpg') to store for the encoded image `data`; SkipSample when unusable."""
    img = decode(data, where)
    if opts.min_size is not None and min(img.size) < opts.min_size:
        raise SkipSample("too_small", f"{where}: {img.width}x{img.height} < --min-size {opts.min_size}")
    resized = opts.size is not None or (opts.max_side is not None and max(img.size) > opts.max_side)
    if not resized and opts.jpeg_quality is None and img.format in PASSTHROUGH:
        return data, PASSTHROUGH[img.format]
    rgb = rgb_on_white(img)
    if opts.size is not None:
        rgb = resize_short_side(rgb, opts.size)
    if opts.max_side is not None:
        rgb = resize_max_side(rgb, opts.max_side)
    if opts.jpeg_quality is not None:
        return encode_jpeg(rgb, opts.jpeg_quality), "jpg"
    return encode_png(rgb), "png"
