"""`data.decode_on_device`: the loader hands over JPEG bytes; the training process decodes a whole
batch on its device and crops, resizes and normalises it there.

Why: decoding is what a CPU data path spends its cores on. A 224-256 px JPEG costs a core 2-4 ms,
so a GPU training CLIP ViT-B/16 at 3-4k samples/s needs 8-15 cores of decoding (BENCHMARKS.md,
"GPU"; `benchmarks/loader.py` prints the figure for a measured step rate). nvJPEG decodes a batch
on the GPU (`torchvision.io.decode_jpeg(list_of_tensors, device="cuda")`), which leaves the workers
reading tars and checking headers.

The worker side (`EncodedJpegToPair`) checks a sample as `SampleToPair` does (caption, json,
marks), reads only the JPEG header (PIL, no decoding: format and size) and copies the bytes into a
fixed-size row: `data.decode_max_bytes` (default: the size of the uint8 image the model takes,
3 x size x size, at least 64 KiB, so the hand-off is never bigger than the uint8 one). A sample
that is not a JPEG is skipped as `not_jpeg`, a bigger file as `too_many_bytes`, both counted.

The device side (`DeviceImages`) decodes the batch (RGB), then runs the method's own image
transform on each decoded uint8 tensor: geometric steps through torchvision.transforms.v2's
functional ops (resized_crop, resize, center_crop, antialiased, the same interpolation), with the
random crop drawn exactly as the CPU path draws it (the same per-sample seed, the same RNG calls,
the same image size: the same crop box), photometric steps (open_clip's colour jitter, grayscale)
on the tensor as they are. The result is the uint8 (B, 3, S, S) batch of the uint8 hand-off, which
`uint8_images.BatchNormalize` turns into the same float32 range; pixel values differ from PIL's
resampling by a few levels at most (tests/test_device_decode.py).

On a CPU run the key is allowed and decodes on the CPU through the same function (torchvision's
libjpeg-turbo decoder, in the training process): that is how the path is tested without a GPU,
and it is slower than decoding in the workers, which the log says.
"""

from __future__ import annotations

import io
import logging
from typing import Any, Callable

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F2

from baton.errors import BatonError
from pretrain.data.samples import IMAGE_KEYS, Rejected, SampleToPair, seeded_transform

MIN_MAX_BYTES = 64 << 10
JPEG_KEYS = ("jpg", "jpeg")
log = logging.getLogger("baton.data")


def max_encoded_bytes(setting: int | None, image_size: int) -> int:
    """`data.decode_max_bytes`, or its default: the uint8 image's bytes (3 x size^2), at least 64 KiB."""
    return int(setting) if setting else max(3 * image_size * image_size, MIN_MAX_BYTES)


def check_decode_on_device(cfg, method_cls, device: torch.device) -> None:
    """Refuse `data.decode_on_device` where it cannot take effect; warn that a CPU run decodes in the
    training process."""
    if not cfg.data.decode_on_device:
        return
    if not getattr(method_cls, "decodes_on_device", False):
        raise BatonError(f"data.decode_on_device=true is implemented for method clip only, not {cfg.method!r}: "
                         f"set data.decode_on_device=false")
    if cfg.data.image_handoff == "float":
        raise BatonError("data.decode_on_device=true hands JPEG bytes to the training process, which cannot be "
                         "combined with data.image_handoff=float (workers normalising images): leave "
                         "data.image_handoff at auto or uint8")
    if torch.device(device).type == "cpu":
        log.warning("data.decode_on_device=true on a CPU run: JPEGs are decoded in the training process on the "
                    "CPU (the GPU path's code, for testing); the workers' decoding (false) is faster on a CPU")


class EncodedJpegToPair(SampleToPair):
    """Raw sample -> (JPEG bytes padded to `max_bytes`, their length, the sample's seed, token ids).

    The seed is the one `SampleToPair` would augment with, so the device draws the same crop."""

    def __init__(self, tokenizer: Callable, caption: str, max_bytes: int):
        super().__init__(transform=None, tokenizer=tokenizer, caption=caption)
        self.max_bytes = max_bytes

    def __call__(self, sample: dict[str, Any], seed: int) -> tuple[torch.Tensor, ...]:
        captions = self.captions(sample)
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        data = sample[key]
        try:
            with Image.open(io.BytesIO(data)) as header:   # reads the header only
                fmt = header.format
        except Exception as e:
            raise Rejected("bad_image", f"{type(e).__name__}: {e}") from None
        if fmt != "JPEG":
            raise Rejected("not_jpeg", f"a {fmt or key} image: data.decode_on_device decodes JPEGs only "
                                       f"(rewrite the shards as JPEG or set data.decode_on_device=false)")
        if len(data) > self.max_bytes:
            raise Rejected("too_many_bytes", f"{len(data)} bytes > data.decode_max_bytes={self.max_bytes}")
        row = torch.zeros(self.max_bytes, dtype=torch.uint8)
        row[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        text = self.pick_caption(captions, seed)
        return row, torch.tensor(len(data)), torch.tensor(seed, dtype=torch.int64), self.tokenizer([text])[0]


def device_steps(transform: Callable) -> list[Callable]:
    """The steps of a PIL transform (a Compose ending in ToTensor + Normalize) that run on a decoded
    uint8 tensor, geometric ones as torchvision.transforms.v2 functional ops; an unknown step is an error."""
    steps = list(getattr(transform, "transforms", [transform]))
    out: list[Callable] = []
    for step in steps:
        name = type(step).__name__
        if isinstance(step, T.RandomResizedCrop):
            out.append(_RandomResizedCrop(step))
        elif isinstance(step, T.Resize):
            out.append(lambda x, s=step: F2.resize(x, s.size, interpolation=s.interpolation,
                                                   max_size=s.max_size, antialias=True))
        elif isinstance(step, T.CenterCrop):
            out.append(lambda x, s=step: F2.center_crop(x, list(s.size)))
        elif name in ("MaybeConvertMode", "_convert_to_rgb") or isinstance(step, (T.ToTensor, T.Normalize)):
            continue   # decoded as RGB; the normalisation is BatchNormalize's, after the batch is stacked
        elif name in ("color_jitter", "gray_scale") or isinstance(step, (T.ColorJitter, T.RandomGrayscale,
                                                                          T.RandomApply, T.Grayscale)):
            out.append(step)   # torchvision's tensor kernels; the same random draws as on PIL images
        else:
            raise BatonError(f"data.decode_on_device: the image transform step {step!r} has no on-device "
                             f"version; set data.decode_on_device=false")
    return out


class _RandomResizedCrop:
    """RandomResizedCrop's box drawn by torchvision's own get_params (the CPU path's draws), then
    v2's resized_crop on the tensor."""

    def __init__(self, step: T.RandomResizedCrop):
        self.step = step

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        s = self.step
        top, left, h, w = s.get_params(x, s.scale, s.ratio)
        return F2.resized_crop(x, top, left, h, w, list(s.size), interpolation=s.interpolation, antialias=True)


class _Steps:
    def __init__(self, steps: list[Callable]):
        self.steps = steps

    def __call__(self, x):
        for step in self.steps:
            x = step(x)
        return x


def decode_jpegs(encoded: torch.Tensor, lengths: torch.Tensor, device: torch.device,
                 keys: list[str] | None = None) -> list[torch.Tensor]:
    """(B, max_bytes) padded JPEG bytes + lengths (on the CPU) -> B uint8 (3, H, W) RGB images on
    `device`, decoded as one batch (nvJPEG on CUDA, libjpeg-turbo on the CPU)."""
    rows = [encoded[i, :int(n)] for i, n in enumerate(lengths.tolist())]
    try:
        return decode_jpeg(rows, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        pass
    for i, row in enumerate(rows):   # find the image that failed, to name it
        try:
            decode_jpeg(row, mode=ImageReadMode.RGB, device=device)
        except RuntimeError as e:
            name = keys[i] if keys else f"row {i} of the batch"
            raise BatonError(f"data.decode_on_device: sample {name} cannot be decoded on {device} ({e}); "
                             f"the workers check JPEG headers only: rewrite the shards or set "
                             f"data.decode_on_device=false") from None
    raise BatonError(f"data.decode_on_device: a batch failed to decode on {device} while each image decodes alone")


class DeviceImages:
    """The training-process side: (bytes, lengths, seeds, *rest) -> (uint8 images on the device, *rest)."""

    def __init__(self, transform: Callable, device: torch.device):
        self.steps = _Steps(device_steps(transform))
        self.device = torch.device(device)

    def __call__(self, batch: tuple, keys: list[str] | None = None) -> tuple:
        encoded, lengths, seeds, *rest = batch
        images = decode_jpegs(encoded, lengths, self.device, keys)
        out = [seeded_transform(self.steps, image, int(seed)) for image, seed in zip(images, seeds.tolist())]
        return (torch.stack(out), *rest)
