"""DINO's multi-crop augmentation (main_dino.py `DataAugmentationDINO`) as the loader's SampleMap.

Each sample gives 2 global crops (RandomResizedCrop scale 0.4-1 at `global_crop_size`) and
`n_local_crops` local ones (scale 0.05-0.4 at the smaller `local_crop_size`), each flipped,
colour-jittered (p 0.8), grey-scaled (p 0.2) and Gaussian-blurred with p 1.0 (first global),
0.1 (second global) or 0.5 (locals); the second global crop is also solarised (p 0.2). All from
torchvision. The draws are seeded per sample (`pretrain.data.seeded_transform`), so a sample's
crops are the same on a resumed run. Images only: a sample without a caption is still used.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from PIL import Image
from torchvision import transforms as T

from baton.errors import BatonError
from pretrain.data import decode_image, seeded_transform
from pretrain.data.uint8_images import BatchNormalize
from pretrain.dino.config import DinoConfig


def _blur(p: float, sigma: list[float]) -> T.RandomApply:
    # a kernel wide enough for the largest sigma (PIL's GaussianBlur radius in the reference is sigma)
    kernel = 2 * math.ceil(3 * float(sigma[1])) + 1
    return T.RandomApply([T.GaussianBlur(kernel, sigma=(float(sigma[0]), float(sigma[1])))], p=p)


class MultiCrop:
    """(raw webdataset sample, seed) -> (global1, global2, local1, ..., localN) normalised tensors,
    or with `uint8` the same crops as uint8 tensors and `batch_normalize` to finish them per batch
    (on the device; or set `row_normalize` to it and the loader's workers do it: see SampleMap)."""

    def __init__(self, cfg: DinoConfig, uint8: bool = False):
        if len(cfg.blur_prob) != 3:
            raise BatonError(f"dino.blur_prob must be 3 probabilities (global 1, global 2, locals), "
                             f"got {cfg.blur_prob}")
        for key in ("global_crop_scale", "local_crop_scale", "blur_sigma"):
            lo_hi = getattr(cfg, key)
            if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
                raise BatonError(f"dino.{key} must be [low, high] with 0 < low <= high, got {lo_hi}")
        if cfg.n_local_crops < 0:
            raise BatonError(f"dino.n_local_crops must be >= 0, got {cfg.n_local_crops}")
        bicubic = T.InterpolationMode.BICUBIC
        flip_and_colour = [
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(*cfg.color_jitter)], p=cfg.color_jitter_prob),
            T.RandomGrayscale(p=cfg.gray_scale_prob),
        ]
        normalize = [T.PILToTensor()] if uint8 else [T.ToTensor(), T.Normalize(cfg.mean, cfg.std)]
        self.batch_normalize = BatchNormalize(cfg.mean, cfg.std) if uint8 else None
        self.row_normalize: BatchNormalize | None = None

        def crop(size: int, scale: list[float]) -> T.RandomResizedCrop:
            return T.RandomResizedCrop(size, scale=tuple(scale), interpolation=bicubic, antialias=True)

        g_crop = crop(cfg.global_crop_size, cfg.global_crop_scale)
        self.global1 = T.Compose([g_crop, *flip_and_colour, _blur(cfg.blur_prob[0], cfg.blur_sigma), *normalize])
        self.global2 = T.Compose([g_crop, *flip_and_colour, _blur(cfg.blur_prob[1], cfg.blur_sigma),
                                  T.RandomSolarize(threshold=128, p=cfg.solarize_prob), *normalize])
        self.local = T.Compose([crop(cfg.local_crop_size, cfg.local_crop_scale), *flip_and_colour,
                                _blur(cfg.blur_prob[2], cfg.blur_sigma), *normalize])
        self.n_local = cfg.n_local_crops

    def crops(self, image: Image.Image) -> tuple[torch.Tensor, ...]:
        """All crops of one image, drawing from the global RNGs (unseeded)."""
        return (self.global1(image), self.global2(image), *(self.local(image) for _ in range(self.n_local)))

    def __call__(self, sample: dict[str, Any], seed: int) -> tuple[torch.Tensor, ...]:
        return seeded_transform(self.crops, decode_image(sample), seed)
