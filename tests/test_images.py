"""One image-to-RGB rule (`baton.images.rgb_on_white`) in every stage: an image with transparency
decodes to the same RGB pixels, on white, in data_prep, in pretraining's sample maps and in
finetuning's datasets."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from baton.images import rgb_on_white


def transparent_image(mode: str) -> Image.Image:
    """8x8: a fully transparent left half, a half-transparent red right half (P: fully opaque red)."""
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    rgba.paste(Image.new("RGBA", (4, 8), (200, 0, 0, 128 if mode != "P" else 255)), (4, 0))
    if mode == "P":
        p = rgba.convert("RGB").quantize(colors=4)
        p.info["transparency"] = p.getpixel((0, 0))   # the left half's palette index is transparent
        return p
    return rgba.convert(mode)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_every_stage_decodes_transparency_on_white_with_the_same_pixels(mode, tmp_path):
    from data_prep.images import ImageOptions, prepare_image
    from finetune.datasets import load_dataset, load_image
    from pretrain.data import decode_image

    img = transparent_image(mode)
    data = png_bytes(img)
    want = np.asarray(rgb_on_white(Image.open(io.BytesIO(data))))
    assert tuple(want[0, 0]) == (255, 255, 255)                      # transparent: white, not black
    if mode == "RGBA":
        assert tuple(want[0, 7]) == (227, 127, 127)                  # half red on white

    stored, ext = prepare_image(data, "x.png", ImageOptions(size=8))    # data_prep re-encodes: RGB
    assert ext == "png" and Image.open(io.BytesIO(stored)).mode == "RGB"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(stored))), want)
    np.testing.assert_array_equal(np.asarray(decode_image({"png": data})), want)   # pretraining (CLIP, DINO)
    (tmp_path / "x.png").write_bytes(data)
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "x.png")), want)  # cub / cars / sop

    for c in ("a", "b"):                                              # finetuning's class folders
        (tmp_path / "folder" / c).mkdir(parents=True)
        (tmp_path / "folder" / c / "x.png").write_bytes(data)
    split = load_dataset("folder", tmp_path / "folder")
    np.testing.assert_array_equal(np.asarray(split.train[0][0]), want)


def test_images_without_alpha_are_converted_as_pillow_does():
    gray = Image.new("L", (2, 2), 77)
    assert rgb_on_white(gray).getpixel((0, 0)) == (77, 77, 77)
    rgb = Image.new("RGB", (2, 2), (1, 2, 3))
    assert rgb_on_white(rgb).mode == "RGB" and rgb_on_white(rgb).getpixel((1, 1)) == (1, 2, 3)
