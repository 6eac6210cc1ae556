"""CIFAR augmentation of a whole uint8 batch with a few tensor ops, on any device.

The per-sample recipe of the torchvision baseline is RandomCrop(32, padding=4) (zero fill),
RandomHorizontalFlip(), ToTensor(), Normalize(mean, std). Run per sample in Python that costs more than
decoding a 32x32 image; here the same distribution comes from one gather over a whole batch:

1. the batch is copied once into a zero canvas that holds each image, padded, next to its mirror image;
2. `unfold` views every possible crop window of that canvas (no copy);
3. one advanced-indexing gather picks each sample's window: its row offset, and its column offset in
   the plain half or the mirrored half (the flip). The result is NCHW whatever the input layout, so an
   HWC batch is transposed by the same gather;
4. one conversion to float32 fused with the normalisation (x * 1/(255 std) - mean/std).

Offsets (0..2*padding for rows and columns) and flips (p = 0.5) are drawn per sample from a
`torch.Generator`, so a seed fixes the augmentation. Validation batches only get step 4.
"""

from __future__ import annotations

import functools

import torch

from feedrate.errors import FeedrateError
from loaders.base import CIFAR10_MEAN, CIFAR10_STD, CROP_PADDING

LAYOUTS = ("NCHW", "NHWC")


def _check(images: torch.Tensor, layout: str) -> None:
    if layout not in LAYOUTS:
        raise FeedrateError(f"unknown layout {layout!r}; accepted: {', '.join(LAYOUTS)}")
    if images.dim() != 4 or images.dtype != torch.uint8:
        raise FeedrateError(
            f"expected a uint8 batch of 4 dimensions, got {images.dtype} {tuple(images.shape)}"
        )


@functools.lru_cache(maxsize=16)
def _affine(
    device: torch.device, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[torch.Tensor, ...]:
    """(scale, shift) with x * scale + shift == (x / 255 - mean) / std, made once per device, not per
    batch (on CUDA each fresh small tensor is a host-to-device copy)."""
    shape = (1, len(mean), 1, 1)
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=device).view(shape)
    shift = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)], device=device).view(shape)
    return scale, shift


def normalize(
    images: torch.Tensor,
    layout: str = "NCHW",
    mean: tuple[float, ...] = CIFAR10_MEAN,
    std: tuple[float, ...] = CIFAR10_STD,
) -> torch.Tensor:
    """uint8 images (0-255) as float32 NCHW, normalised per channel: what ToTensor + Normalize give."""
    _check(images, layout)
    if layout == "NHWC":
        images = images.permute(0, 3, 1, 2)
    scale, shift = _affine(images.device, tuple(mean), tuple(std))
    out = torch.empty(images.shape, dtype=torch.float32, device=images.device)
    out.copy_(images)  # one pass: uint8 -> float32 (and NHWC -> NCHW when permuted)
    return out.mul_(scale).add_(shift)


def crop_flip(
    images: torch.Tensor,
    dy: torch.Tensor,
    dx: torch.Tensor,
    flip: torch.Tensor,
    padding: int = CROP_PADDING,
    layout: str = "NCHW",
) -> torch.Tensor:
    """Each image zero-padded by `padding`, cropped back to its size at (dy[i], dx[i]) and mirrored
    left-right where flip[i]; returned as uint8 NCHW. Offsets are in 0..2*padding."""
    _check(images, layout)
    if layout == "NCHW":
        images = images.permute(0, 2, 3, 1)  # gather below reads an HWC canvas either way
    n, h, w, c = images.shape
    hp, wp = h + 2 * padding, w + 2 * padding
    canvas = images.new_zeros((n, hp, 2 * wp, c))
    canvas[:, padding : padding + h, padding : padding + w] = images
    canvas[:, padding : padding + h, wp + padding : wp + padding + w] = images.flip(2)
    windows = canvas.unfold(1, h, 1).unfold(2, w, 1)  # (n, rows, cols, c, h, w): a view
    # A flipped crop at dx is the mirror half's window at 2*padding - dx.
    col = torch.where(flip, wp + 2 * padding - dx, dx)
    rows = torch.arange(n, device=images.device)
    return windows[rows, dy, col]


def random_crop_flip(
    images: torch.Tensor,
    generator: torch.Generator,
    padding: int = CROP_PADDING,
    layout: str = "NCHW",
) -> torch.Tensor:
    """RandomCrop(size, padding) + RandomHorizontalFlip() for every image of a uint8 batch (-> NCHW)."""
    n = images.shape[0]
    device = images.device
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=device)
    flip = torch.rand(n, generator=generator, device=device) < 0.5
    return crop_flip(images, offsets[0], offsets[1], flip, padding, layout)


def augment(
    images: torch.Tensor,
    generator: torch.Generator,
    layout: str = "NCHW",
    padding: int = CROP_PADDING,
    mean: tuple[float, ...] = CIFAR10_MEAN,
    std: tuple[float, ...] = CIFAR10_STD,
) -> torch.Tensor:
    """The training transform of a uint8 batch: random crop + flip, then float32 normalisation."""
    return normalize(random_crop_flip(images, generator, padding, layout), "NCHW", mean, std)
