"""Images handed over as uint8 and normalised per batch equal the float transforms bit for bit."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from pretrain.clip.config import AugmentConfig
from pretrain.data import decode_image, seeded_transform
from pretrain.data.uint8_images import BatchNormalize, split_normalize
from pretrain.dino.augment import MultiCrop
from pretrain.dino.config import DinoConfig


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = int(rng.integers(20, 90)), int(rng.integers(20, 90))
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(decode_image({"png": buf.getvalue()}))
    return out


def open_clip_train_transform():
    from pretrain.clip.model import build_transforms

    pp = {"image_size": 48, "mean": (0.48145466, 0.4578275, 0.40821073),
          "std": (0.26862954, 0.26130258, 0.27577711), "interpolation": "bicubic"}
    return build_transforms(pp, AugmentConfig(scale=[0.5, 1.0], color_jitter_prob=0.8, gray_scale_prob=0.2))[0]


def test_open_clip_transform_split_gives_the_same_floats():
    transform = open_clip_train_transform()
    uint8_transform, normalize = split_normalize(transform)
    assert normalize is not None
    pics = images(12)
    floats = torch.stack([seeded_transform(transform, im, 100 + i) for i, im in enumerate(pics)])
    bytes_ = torch.stack([seeded_transform(uint8_transform, im, 100 + i) for i, im in enumerate(pics)])
    assert bytes_.dtype == torch.uint8 and bytes_.shape == floats.shape
    assert torch.equal(normalize(bytes_), floats)
    assert bytes_.element_size() * 4 == floats.element_size()


def test_dino_multicrop_uint8_crops_normalise_to_the_float_crops():
    cfg = DinoConfig(global_crop_size=40, local_crop_size=16, n_local_crops=3, color_jitter_prob=0.8,
                     solarize_prob=0.5, blur_prob=[1.0, 0.5, 0.5], blur_sigma=[0.1, 1.0])
    plain, uint8 = MultiCrop(cfg), MultiCrop(cfg, uint8=True)
    assert plain.batch_normalize is None and uint8.batch_normalize is not None
    pics = images(6, seed=1)
    for i, im in enumerate(pics):
        want = seeded_transform(plain.crops, im, i)
        got = seeded_transform(uint8.crops, im, i)
        assert all(g.dtype == torch.uint8 for g in got)
        for w, g in zip(want, got, strict=True):
            assert torch.equal(uint8.batch_normalize(g[None])[0], w)


@pytest.mark.parametrize("transform", [
    T.Compose([T.Resize(8), T.ToTensor()]),                                   # no Normalize
    T.Compose([T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3), T.Lambda(lambda x: x * 2)]),  # not last
    T.Compose([T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3, inplace=True)]),
    lambda im: im,                                                            # not a Compose
])
def test_other_transforms_are_left_as_they_are(transform):
    assert split_normalize(transform) == (transform, None)


def test_batch_normalize_refuses_floats():
    with pytest.raises(TypeError, match="uint8"):
        BatchNormalize([0.5], [0.5])(torch.zeros(1, 1, 2, 2))


def test_method_on_device_normalises_only_uint8_tensors():
    from types import SimpleNamespace

    from baton.distributed import DistInfo
    from pretrain.method import PretrainMethod

    method = PretrainMethod(SimpleNamespace(), DistInfo())
    images_u8 = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    tokens = torch.randint(0, 100, (2, 5))
    assert method.on_device((images_u8, tokens))[0] is images_u8           # no batch_normalize: as is
    method.batch_normalize = BatchNormalize([0.1, 0.2, 0.3], [0.5, 0.6, 0.7])
    out_images, out_tokens = method.on_device((images_u8, tokens))
    assert out_tokens is tokens
    want = T.Normalize([0.1, 0.2, 0.3], [0.5, 0.6, 0.7])(images_u8.float() / 255)
    assert torch.equal(out_images, want)
