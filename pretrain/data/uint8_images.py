"""Images cross from the loader's workers to the training process as uint8 and are normalised there.

Why: a 224 px image is 150 KB as uint8 and 600 KB as float32. Every byte a worker hands over is
written into shared memory, and the float conversion and normalisation are two more passes over
the 600 KB in the worker (BENCHMARKS.md, loader section); a GPU normalises a batch in
microseconds. timm's prefetching loader does the same. On a CPU-only run the normalisation would
move from the parallel workers to the training process, so `data.image_handoff: auto` hands over
uint8 only when training on a GPU.

`split_normalize` takes a transform that ends in `ToTensor(), Normalize(mean, std)` (open_clip's
and DINO's do) applied to PIL RGB images (the loader's `decode_image` gives those) and returns the
same steps ending in a uint8 tensor, plus a `BatchNormalize` that turns a batch of those into
exactly (bit for bit) what the original transform gives: x / 255, minus mean, divided by std, the
same float32 operations in the same order.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torchvision import transforms as T

from baton.registry import unknown_name

HANDOFFS = ("auto", "uint8", "float")


def hands_over_uint8(setting: str, device: torch.device) -> bool:
    """`data.image_handoff`: whether the workers hand images over as uint8 on this device."""
    if setting not in HANDOFFS:
        raise unknown_name("data.image_handoff", setting, HANDOFFS)
    return setting == "uint8" or (setting == "auto" and torch.device(device).type != "cpu")


class BatchNormalize:
    """uint8 images (..., C, H, W) -> float32 (x / 255 - mean) / std, on the images' device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"BatchNormalize takes uint8 images, got {images.dtype}")
        # The loader's uint8 batches keep PIL's (H, W, C) layout (pretrain.data.batch_buffers): the
        # model gets the usual contiguous (N, C, H, W) floats, as from the float hand-off.
        return self.in_place(images.contiguous().to(torch.float32))

    def in_place(self, pixels: torch.Tensor) -> torch.Tensor:
        """float32 tensor holding uint8 values (0..255) -> normalised, in place (a loader worker does
        this in each batch row: pretrain.data.batch_buffers)."""
        if self.mean.device != pixels.device:  # moved once, not copied to the GPU every batch
            self.mean, self.std = self.mean.to(pixels.device), self.std.to(pixels.device)
        return pixels.div_(255).sub_(self.mean).div_(self.std)

    def __repr__(self) -> str:
        return f"BatchNormalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def split_normalize(transform: Callable) -> tuple[Callable, BatchNormalize | None]:
    """(transform ending in a uint8 tensor, its BatchNormalize) if `transform` is a Compose ending in
    ToTensor + Normalize; otherwise (transform, None): it is used as it is, floats handed over."""
    steps = getattr(transform, "transforms", None)
    if not isinstance(transform, T.Compose) or not steps or len(steps) < 2:
        return transform, None
    to_tensor, normalize = steps[-2], steps[-1]
    # ToTensor or a subclass (open_clip's MaybeToTensor: ToTensor on PIL images, which the loader's are)
    if not isinstance(to_tensor, T.ToTensor) or type(normalize) is not T.Normalize or normalize.inplace:
        return transform, None
    return T.Compose([*steps[:-2], T.PILToTensor()]), BatchNormalize(normalize.mean, normalize.std)
