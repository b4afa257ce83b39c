"""The one image-to-RGB rule of the project: transparency is composited on white.

Every stage decodes images (data_prep before writing a shard, pretraining's sample maps and
held-out sets, finetuning's datasets), and they must agree pixel for pixel: a model pretrained on
emoji whose transparent background turned black (`convert("RGB")` drops alpha) and finetuned on
the same emoji on white would see two different datasets. RGBA, LA, PA and palette images with a
transparent colour are composited on an opaque white background; every other mode is converted
to RGB as Pillow does.
"""

from __future__ import annotations

from PIL import Image

WHITE = (255, 255, 255, 255)


def rgb_on_white(img: Image.Image) -> Image.Image:
    """`img` as an RGB image, any transparency composited on white."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode.endswith("A"):   # RGBA, LA, PA, La, RGBa: an alpha channel
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba).convert("RGB")
    return img.convert("RGB")
