"""CIFAR augmentation of a whole uint8 batch with a few tensor ops, on any device.

The per-sample recipe of the torchvision baseline is RandomCrop(32, padding=4) (zero fill),
RandomHorizontalFlip(), ToTensor(), Normalize(mean, std). Run per sample in Python that costs more than
decoding a 32x32 image; here the same distribution comes from one gather over a whole batch:

1. the batch is copied once into a zero canvas that holds each image, padded, and its mirror image;
2. every possible crop window of that canvas is viewed (no copy);
3. one gather picks each sample's window: its row offset, and its column offset in the plain or the
   mirrored canvas (the flip);
4. one conversion to float32 and the normalisation (x * 1/(255 std) - mean/std); a batch whose memory
   is NHWC stays so (channels_last: NCHW by shape), see `normalize`.

Two ways to do steps 1-3, one result (tests/test_augment.py holds them to torchvision's transforms):
- on the CPU, for an NHWC batch (what every wds decoder yields), `_crop_flip_rows`: the canvas is kept
  per thread and shape (its zero border is written once), the mirror is one OpenCV `flip` of the whole
  canvas seen as one tall image when OpenCV is installed (0.7 us/img where torch.flip of a 3-byte pixel
  costs 2.5), and the gather copies whole crop rows (96 contiguous bytes each) out of a sliding-window
  view of the canvas with one `index_select` of n*32 row starts: ~1 us/img, where the general path's
  gather of single pixels out of a 6-d `unfold` view costs ~6;
- elsewhere (a GPU, an NCHW batch), `unfold` views the windows and one advanced-indexing gather picks
  them, transposing to NCHW on the way.
Step 4 runs in chunks of NORMALIZE_CHUNK images on the CPU, so the multiply and add passes find the
chunk still in cache: with the crop rows, ~4-5 us/img in all on one core, was ~9-10 (measured in an
earlier session); left in channels_last memory, ~2 of those 4-5 more go (`normalize`).

Offsets (0..2*padding for rows and columns) and flips (p = 0.5) are drawn per sample from a
`torch.Generator`, so a seed fixes the augmentation. Validation batches only get step 4.

`EpochDraws` draws them up front instead, for every sample of a split at once from (seed, epoch), and
a batch looks its samples' draws up by sample number: a sample's augmentation is then a function of
(seed, epoch, sample) alone, the same whichever rank, worker or batch reads it, and the same when an
interrupted epoch is resumed (loaders.resume). Drawing 50,000 samples' draws costs about a millisecond
an epoch.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import torch

from feedrate.errors import FeedrateError
from loaders.base import CIFAR10_MEAN, CIFAR10_STD, CROP_PADDING
from loaders.seeds import SAMPLES, epoch_seed

LAYOUTS = ("NCHW", "NHWC")
NORMALIZE_CHUNK = 32  # images per multiply-add pass on the CPU (a 384 KB float chunk stays in cache)
_canvases = threading.local()  # per thread: shape -> (canvas, row windows), zero borders written once


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


@functools.lru_cache(maxsize=16)
def _affine_pixels(
    device: torch.device, mean: tuple[float, ...], std: tuple[float, ...], pixels: int
) -> tuple[torch.Tensor, ...]:
    """`_affine`'s (scale, shift) repeated for every pixel of an image flattened as HWC: (pixels * C,)
    each. A multiply by a vector as long as the image's row runs vectorised, where a broadcast over an
    innermost channel axis of 3 does not (see `normalize`)."""
    scale, shift = _affine(device, mean, std)
    return scale.view(-1).repeat(pixels), shift.view(-1).repeat(pixels)


def _as_nhwc(images: torch.Tensor, layout: str) -> torch.Tensor | None:
    """The batch as a contiguous NHWC tensor without a copy, when its memory is laid out that way: an
    NHWC batch, or an NCHW one in channels_last memory (what `crop_flip` returns on the CPU)."""
    if layout == "NHWC":
        return images if images.is_contiguous() else None
    if not images.is_contiguous() and images.is_contiguous(memory_format=torch.channels_last):
        return images.permute(0, 2, 3, 1)
    return None


def normalize(
    images: torch.Tensor,
    layout: str = "NCHW",
    mean: tuple[float, ...] = CIFAR10_MEAN,
    std: tuple[float, ...] = CIFAR10_STD,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 images (0-255) as float32 NCHW, normalised per channel: what ToTensor + Normalize give.
    `out`: written there instead (float32, of the shape and memory format returned), for a caller that
    reuses its batch buffers.

    A batch whose memory is NHWC (`_as_nhwc`) comes back in channels_last memory: NCHW by shape and
    indexing, with the pixels' bytes where the input had them. Transposing to NCHW memory on the way
    cost 4.4-5.0 us/img of one core here, the float conversion alone 2.1 (256 images of 32x32x3, the
    same values to the bit; torch's strided copy and its broadcast over a channel axis of 3 do not
    vectorise). Convolutions take either memory format; on CUDA the training loop gives the model its
    own format (training.models.Stepper), and on the CPU a step of `--arch small` was faster with
    such a batch (209 against 264 us/img) and ResNet-50's the same within the noise."""
    _check(images, layout)
    nhwc = _as_nhwc(images, layout)
    nchw = images.permute(0, 3, 1, 2) if layout == "NHWC" else images
    out = _buffer(out, nchw, channels_last=nhwc is not None)
    step = NORMALIZE_CHUNK if images.device.type == "cpu" else max(1, len(images))
    if nhwc is not None:
        n, h, w, c = nhwc.shape
        scale, shift = _affine_pixels(images.device, tuple(mean), tuple(std), h * w)
        flat_in, flat_out = nhwc.view(n, h * w * c), out.permute(0, 2, 3, 1).view(n, h * w * c)
        for start in range(0, n, step):
            chunk = flat_out[start : start + step]
            chunk.copy_(flat_in[start : start + step])
            chunk.mul_(scale).add_(shift)
        return out
    scale, shift = _affine(images.device, tuple(mean), tuple(std))
    for start in range(0, len(nchw), step):
        chunk = out[start : start + step]
        chunk.copy_(nchw[start : start + step])  # uint8 -> float32 (and NHWC -> NCHW when permuted)
        chunk.mul_(scale).add_(shift)
    return out


def _buffer(out: torch.Tensor | None, nchw: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The float32 batch `normalize` writes for `nchw` (uint8, NCHW by shape): `out` once checked to
    fit, else a new one; in channels_last memory where the input's memory is NHWC."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if out is None:
        return torch.empty(nchw.shape, dtype=torch.float32, device=nchw.device, memory_format=fmt)
    if (
        out.shape != nchw.shape
        or out.dtype != torch.float32
        or out.device != nchw.device
        or not out.is_contiguous(memory_format=fmt)
    ):
        raise FeedrateError(
            f"normalize: out is {out.dtype} {tuple(out.shape)} on {out.device}; expected float32 "
            f"{tuple(nchw.shape)} in {'channels_last' if channels_last else 'contiguous'} memory on "
            f"{nchw.device}"
        )
    return out


def crop_flip(
    images: torch.Tensor,
    dy: torch.Tensor,
    dx: torch.Tensor,
    flip: torch.Tensor,
    padding: int = CROP_PADDING,
    layout: str = "NCHW",
) -> torch.Tensor:
    """Each image zero-padded by `padding`, cropped back to its size at (dy[i], dx[i]) and mirrored
    left-right where flip[i]; returned as uint8 NCHW (on the CPU, from a contiguous NHWC batch, in
    channels_last memory: see `normalize`). Offsets are in 0..2*padding."""
    _check(images, layout)
    if layout == "NHWC" and images.device.type == "cpu" and images.is_contiguous():
        return _crop_flip_rows(images, dy, dx, flip, padding).permute(0, 3, 1, 2)
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


def _canvas(n: int, h: int, w: int, c: int, padding: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This thread's zeroed canvas for n images, padded (`[0]`: plain, `[1]`: mirrored), and the view of
    every run of w pixels in it (row windows, one per pixel start)."""
    key = (n, h, w, c, padding)
    cache = getattr(_canvases, "by_shape", None)
    if cache is None:
        cache = _canvases.by_shape = {}
    if key not in cache:
        cache.clear()  # one batch size at a time (the last, partial batch replaces it once an epoch)
        canvas = torch.zeros((2, n, h + 2 * padding, w + 2 * padding, c), dtype=torch.uint8)
        cache[key] = (canvas, canvas.view(-1).unfold(0, w * c, c))
    return cache[key]


def _mirror(canvas: torch.Tensor) -> None:
    """canvas[1] = canvas[0] mirrored left-right, every image at once."""
    _, n, hp, wp, c = canvas.shape
    try:
        import cv2
    except ImportError:
        canvas[1] = canvas[0].flip(2)
        return
    plain = canvas[0].numpy().reshape(n * hp, wp, c)  # the batch seen as one tall image
    cv2.flip(plain, 1, dst=canvas[1].numpy().reshape(n * hp, wp, c))


def _crop_flip_rows(
    images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, padding: int
) -> torch.Tensor:
    """`crop_flip` of a contiguous NHWC CPU batch by whole crop rows (see the module docstring); NHWC."""
    n, h, w, c = images.shape
    canvas, windows = _canvas(n, h, w, c, padding)
    hp, wp = h + 2 * padding, w + 2 * padding
    canvas[0, :, padding : padding + h, padding : padding + w] = images
    _mirror(canvas)
    # A flipped crop at dx is the mirrored canvas's window at 2*padding - dx (the padding is symmetric).
    col = torch.where(flip, 2 * padding - dx, dx)
    first = (flip.long() * n + torch.arange(n)) * (hp * wp) + dy * wp + col  # pixel where row 0 starts
    starts = first[:, None] + torch.arange(h)[None, :] * wp
    return windows.index_select(0, starts.view(-1)).view(n, h, w, c)


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


@dataclass(frozen=True)
class EpochDraws:
    """Every sample's crop offsets and flip for one epoch of a split (see the module docstring)."""

    dy: torch.Tensor  # (total,) int64 row offsets, 0..2*padding
    dx: torch.Tensor  # (total,) int64 column offsets
    flip: torch.Tensor  # (total,) bool
    padding: int = CROP_PADDING

    @classmethod
    def draw(
        cls,
        seed: int,
        epoch: int,
        total: int,
        device: str | torch.device = "cpu",
        padding: int = CROP_PADDING,
    ) -> EpochDraws:
        """The draws of epoch `epoch` of a run seeded `seed`, for samples 0..total-1 (on `device`)."""
        generator = torch.Generator(device=device)
        generator.manual_seed(epoch_seed(seed, epoch, stream=SAMPLES))
        offsets = torch.randint(0, 2 * padding + 1, (2, total), generator=generator, device=device)
        flip = torch.rand(total, generator=generator, device=device) < 0.5
        return cls(offsets[0], offsets[1], flip, padding)

    def augment(
        self,
        images: torch.Tensor,
        ids: torch.Tensor,
        layout: str = "NCHW",
        mean: tuple[float, ...] = CIFAR10_MEAN,
        std: tuple[float, ...] = CIFAR10_STD,
    ) -> torch.Tensor:
        """The training transform of a uint8 batch whose samples are numbered `ids` in the split."""
        ids = ids.to(self.dy.device)
        dy, dx, flip = self.dy[ids], self.dx[ids], self.flip[ids]
        if dy.device != images.device:
            dy, dx, flip = dy.to(images.device), dx.to(images.device), flip.to(images.device)
        return normalize(crop_flip(images, dy, dx, flip, self.padding, layout), "NCHW", mean, std)
