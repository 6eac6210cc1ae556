"""Samples sliced out of shard buffers, decoded a batch at a time into one uint8 tensor.

At 32x32 the time goes to per-sample Python, not to pixels, so every path here works on a batch and
touches each sample as little as it can (measured on the 2-core machine, one core, per image):

- raw: no decoding at all. The images of a batch are one gather of fixed-size rows from a sliding-window
  view of the shard buffer (numpy, no per-sample Python), ~0.5 us/img. Layout NHWC, as stored.
- jpg: torchvision's libjpeg-turbo decode op on byte tensors (slices of one tensor over the shard
  buffer) is ~3-4x faster than PIL (`Image.open` + `np.asarray`).
- png: torchvision's decode_png op is ~1.7x faster than PIL.
PIL stays available (`decode="pil"`) as the reference and for comparison. Every decoder yields NHWC:
the layout images are stored and decoded in, so no transposing copy happens before augmentation.

Labels (`.cls` members, ASCII integers) are parsed for a whole shard at once with numpy.
"""

from __future__ import annotations

import importlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from feedrate.cifar import SAMPLE_BYTES

# One batch's images: (buffer, offsets, sizes) per shard part it draws from, in output order.
Parts = Sequence[tuple[memoryview, np.ndarray, np.ndarray]]
IMAGE_SHAPE_HWC = (32, 32, 3)
MAX_LABEL_DIGITS = 6


class DecodeError(Exception):
    """Decoding failed at sample `position` of the batch (counted across parts, in order)."""

    def __init__(self, position: int, cause: str) -> None:
        super().__init__(cause)
        self.position = position
        self.cause = cause


@dataclass(frozen=True)
class Decoder:
    """A batch decoder: `fn(parts)` -> uint8 tensor (n, ...) in `layout`."""

    name: str
    layout: str  # "NHWC" or "NCHW"
    fn: Callable[[Parts], torch.Tensor]
    module: str | None = None  # imported by `prepare`

    def __call__(self, parts: Parts) -> torch.Tensor:
        return self.fn(parts)

    def prepare(self) -> None:
        """Import the decoding library now, in the parent: forked workers then inherit it instead of
        each spending seconds importing it on their first batch."""
        if self.module:
            importlib.import_module(self.module)


def decode_raw(parts: Parts) -> torch.Tensor:
    """Raw HWC uint8 images: each part's rows gathered from a sliding-window view of its buffer."""
    rows = []
    start = 0
    for buffer, offsets, sizes in parts:
        bad = np.flatnonzero(sizes != SAMPLE_BYTES)
        if bad.size:
            size = int(sizes[bad[0]])
            raise DecodeError(start + int(bad[0]), f"raw image of {size} bytes, expected {SAMPLE_BYTES}")
        windows = sliding_window_view(np.frombuffer(buffer, dtype=np.uint8), SAMPLE_BYTES)
        rows.append(windows[offsets])
        start += len(offsets)
    batch = rows[0] if len(rows) == 1 else np.concatenate(rows)
    return torch.from_numpy(batch).view(-1, *IMAGE_SHAPE_HWC)


def _tensor_slices(parts: Parts) -> list[torch.Tensor]:
    """Each encoded image as a uint8 tensor viewing its buffer (no copy)."""
    out = []
    for buffer, offsets, sizes in parts:
        whole = torch.frombuffer(buffer, dtype=torch.uint8)
        out += [whole[o : o + s] for o, s in zip(offsets.tolist(), sizes.tolist(), strict=True)]
    return out


def _stack(images: Sequence[torch.Tensor] | Sequence[np.ndarray], expected: tuple[int, ...]) -> list:
    for i, image in enumerate(images):
        if tuple(image.shape) != expected:
            raise DecodeError(i, f"decoded shape {tuple(image.shape)}, expected {expected}")
    return list(images)


def _image_op(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """torchvision's registered decode op for RGB output, called directly.

    The public `torchvision.io.decode_*` wrappers log, warn (deprecation) and check per call, which
    costs ~10-20 us per 32x32 image next to a 50 us decode; the op they call is the same. A torchvision
    without the op falls back to the public function.
    """
    import torchvision.io as tvio

    rgb = tvio.ImageReadMode.RGB
    op = getattr(torch.ops.image, name, None) if hasattr(torch.ops, "image") else None
    if op is None:
        public = getattr(tvio, name)
        return lambda data: public(data, mode=rgb)
    return lambda data: op(data, rgb.value, False)


def _decode_each(name: str, parts: Parts) -> torch.Tensor:
    op = _image_op(name)
    images = []
    for position, data in enumerate(_tensor_slices(parts)):
        try:
            images.append(op(data))
        except RuntimeError as exc:
            raise DecodeError(position, " ".join(str(exc).split())[:160]) from None
    return _stack_hwc(images)


def decode_jpeg_torchvision(parts: Parts) -> torch.Tensor:
    return _decode_each("decode_jpeg", parts)


def decode_png_torchvision(parts: Parts) -> torch.Tensor:
    return _decode_each("decode_png", parts)


def _stack_hwc(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """torchvision's CHW results as one NHWC batch. They are HWC in memory (a permuted view of the
    decoder's output), so permuting back makes the stack a plain copy instead of a transposing one."""
    return torch.stack(_stack([image.permute(1, 2, 0) for image in images], IMAGE_SHAPE_HWC))


def decode_pil(parts: Parts) -> torch.Tensor:
    """Any format PIL reads, one image at a time (the per-sample reference path), NHWC."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for buffer, offsets, sizes in parts:
        for o, s in zip(offsets.tolist(), sizes.tolist(), strict=True):
            try:
                with Image.open(io.BytesIO(buffer[o : o + s])) as im:
                    images.append(np.asarray(im.convert("RGB")))
            except (OSError, UnidentifiedImageError, ValueError) as exc:
                raise DecodeError(len(images), " ".join(str(exc).split())[:160]) from None
    return torch.from_numpy(np.stack(_stack(images, IMAGE_SHAPE_HWC)))


# (encoding, choice) -> decoder; "auto" is the measured fastest for that encoding.
DECODERS: dict[tuple[str, str], Decoder] = {
    ("raw", "auto"): Decoder("numpy-gather", "NHWC", decode_raw),
    ("raw", "numpy"): Decoder("numpy-gather", "NHWC", decode_raw),
    ("jpg", "auto"): Decoder("torchvision", "NHWC", decode_jpeg_torchvision, "torchvision.io"),
    ("jpg", "torchvision"): Decoder("torchvision", "NHWC", decode_jpeg_torchvision, "torchvision.io"),
    ("jpg", "pil"): Decoder("pil", "NHWC", decode_pil, "PIL.Image"),
    ("png", "auto"): Decoder("torchvision", "NHWC", decode_png_torchvision, "torchvision.io"),
    ("png", "torchvision"): Decoder("torchvision", "NHWC", decode_png_torchvision, "torchvision.io"),
    ("png", "pil"): Decoder("pil", "NHWC", decode_pil, "PIL.Image"),
}


def decode_choices(encoding: str) -> list[str]:
    return [choice for enc, choice in DECODERS if enc == encoding]


def parse_labels(buffer: memoryview, offsets: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, int]:
    """ASCII integer labels at `offsets` (`sizes` digits each), vectorised; (labels, first bad or -1)."""
    n = len(offsets)
    if n == 0:
        return np.zeros(0, dtype=np.int64), -1
    width = int(sizes.max())
    if int(sizes.min()) < 1 or width > MAX_LABEL_DIGITS:
        return np.zeros(n, dtype=np.int64), int(np.flatnonzero((sizes < 1) | (sizes > MAX_LABEL_DIGITS))[0])
    data = np.frombuffer(buffer, dtype=np.uint8)
    columns = np.arange(width)
    used = columns < sizes[:, None]
    positions = np.minimum(offsets[:, None] + columns, len(data) - 1)
    digits = data[positions].astype(np.int64) - ord("0")
    bad = used & ((digits < 0) | (digits > 9))
    if bad.any():
        return np.zeros(n, dtype=np.int64), int(np.flatnonzero(bad.any(axis=1))[0])
    # digit j of a label of size s has weight 10 ** (s - 1 - j)
    powers = np.where(used, 10 ** np.maximum(sizes[:, None] - 1 - columns, 0), 0)
    return (digits * powers).sum(axis=1), -1
