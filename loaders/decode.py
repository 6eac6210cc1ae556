"""Samples sliced out of shard buffers, decoded a batch at a time into one uint8 tensor.

At 32x32 the time goes to per-sample Python, not to pixels, so every path here works on a batch and
touches each sample as little as it can (measured on the 2-core machine, one core, per image):

- raw: no decoding at all. Each part's images are gathered straight into the batch by one torch
  `index_select` of fixed-size rows out of a view of every run of the buffer (no per-sample Python):
  ~1.0 us/img on one core where numpy's `sliding_window_view`, a gather and a concatenation took ~1.5
  (256 images from 6 shards, the same hour). Layout NHWC, as stored.
- jpg: simplejpeg (libjpeg-turbo, exact "islow" DCT: the same pixels as PIL) decodes each image straight
  into its row of the batch (`buffer=`), no per-image array: ~24-28 us/img on one core here, where
  OpenCV's imdecode takes ~30-34, torchvision's decode op ~41 and PIL ~100-115 (32x32 4:4:4 q95, ~2.1 KB;
  fastdct bought nothing measurable on these and changes pixels, so it is off).
- png: OpenCV's imdecode (libpng, RGB order asked for) ~41-43 us/img, torchvision's decode op ~50, PIL
  ~85-95; each result is copied into its row of the batch (3 KB).
All of them release the GIL while they decode (measured: two threads use ~1.7-1.9 cores), which is
what lets the wds loader's readers be threads. "auto" is the fastest one installed; torchvision (whose
image decoding is deprecated in 0.29) stays as a fallback and for comparison.
PIL stays available (`decode="pil"`) as the reference and for comparison. Every decoder yields NHWC:
the layout images are stored and decoded in, so no transposing copy happens before augmentation.

Images are checked before they are decoded: a decoder allocates whatever size the file declares, and
a png of a few hundred bytes can declare 30000x30000 pixels (2.7 GB of RGB). So the size in each
image's header (PNG's IHDR, JPEG's frame header) must be 32x32 before a decoder sees it; the headers of
a batch are read with numpy, a few array operations per batch (`check_headers`). PIL's `Image.open`
reads only the header: its `.size` is checked before anything is decoded.

Labels (`.cls` members, ASCII integers) are parsed for a whole shard at once with numpy, and must be
class indices: at most MAX_LABEL_DIGITS digits (so nothing wraps) and in 0..classes-1.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

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
        """Import the decoding library now, when the loader is built: a missing one fails there, and the
        readers do not each spend their first batch importing it."""
        if self.module:
            importlib.import_module(self.module)


def decode_raw(parts: Parts) -> torch.Tensor:
    """Raw HWC uint8 images: each part's rows gathered straight into the batch, one `index_select` out
    of a view of every SAMPLE_BYTES-long run of its buffer (`unfold`, no copy); see the module
    docstring for what it cost against numpy's `sliding_window_view` (a Python function, per part)."""
    n = sum(len(offsets) for _, offsets, _ in parts)
    batch = torch.empty((n, SAMPLE_BYTES), dtype=torch.uint8)
    start = 0
    for buffer, offsets, sizes in parts:
        bad = np.flatnonzero(sizes != SAMPLE_BYTES)
        if bad.size:
            size = int(sizes[bad[0]])
            raise DecodeError(start + int(bad[0]), f"raw image of {size} bytes, expected {SAMPLE_BYTES}")
        if len(offsets):
            windows = torch.frombuffer(buffer, dtype=torch.uint8).unfold(0, SAMPLE_BYTES, 1)
            rows = torch.from_numpy(np.asarray(offsets, dtype=np.int64))
            torch.index_select(windows, 0, rows, out=batch[start : start + len(offsets)])
        start += len(offsets)
    return batch.view(-1, *IMAGE_SHAPE_HWC)


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


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR"  # the signature, then IHDR's length and type
JPEG_MAX_SEGMENTS = 64  # segments walked looking for the frame header before an image is refused
# JPEG frame headers (SOF0-SOF15, without DHT C4, JPG C8 and DAC CC): where the image size is declared
_SOF = np.zeros(256, dtype=bool)
_SOF[[m for m in range(0xC0, 0xD0) if m not in (0xC4, 0xC8, 0xCC)]] = True
# markers without a length field (TEM, RST0-7); SOI/EOI/SOS before a frame header end the walk
_STANDALONE = np.zeros(256, dtype=bool)
_STANDALONE[[0x01, *range(0xD0, 0xD8)]] = True


def _be16(data: np.ndarray, at: np.ndarray) -> np.ndarray:
    return data[at].astype(np.int64) << 8 | data[at + 1]


def _png_sizes(data: np.ndarray, offsets: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, ...]:
    """(width, height, readable) from each png's IHDR chunk, which the format puts first."""
    n = len(offsets)
    width, height = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    ok = sizes >= len(PNG_SIGNATURE) + 8
    rows = np.flatnonzero(ok)
    if rows.size:
        head = data[offsets[rows, None] + np.arange(len(PNG_SIGNATURE) + 8)]
        ok[rows] = (head[:, : len(PNG_SIGNATURE)] == np.frombuffer(PNG_SIGNATURE, dtype=np.uint8)).all(axis=1)
        fields = head[:, len(PNG_SIGNATURE) :].astype(np.int64)
        weights = 1 << (8 * np.arange(3, -1, -1, dtype=np.int64))
        width[rows], height[rows] = fields[:, :4] @ weights, fields[:, 4:] @ weights
    return width, height, ok


def _jpeg_sizes(data: np.ndarray, offsets: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, ...]:
    """(width, height, readable) from each jpg's first frame header, found by walking the segments
    after SOI, all images of the batch in step (a few iterations: JFIF, the tables, then the frame)."""
    n = len(offsets)
    width, height = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    ok = np.zeros(n, dtype=bool)
    ends = offsets + sizes
    pos = offsets + 2
    todo = np.flatnonzero(sizes >= 4)
    todo = todo[(data[offsets[todo]] == 0xFF) & (data[offsets[todo] + 1] == 0xD8)]  # SOI
    for _ in range(JPEG_MAX_SEGMENTS):
        todo = todo[pos[todo] + 4 <= ends[todo]]  # room for a marker and a length
        if not todo.size:
            break
        at = pos[todo]
        todo = todo[data[at] == 0xFF]
        at = pos[todo]
        marker = data[at + 1]
        fill = marker == 0xFF  # fill bytes may precede a marker
        pos[todo[fill]] += 1
        standalone = _STANDALONE[marker]
        pos[todo[standalone]] += 2
        frame = _SOF[marker] & (at + 9 <= ends[todo])
        found = todo[frame]
        if found.size:
            height[found] = _be16(data, pos[found] + 5)
            width[found] = _be16(data, pos[found] + 7)
            ok[found] = True
        # any other marker with a length: skip its segment (SOS or EOI before a frame: not a usable jpg)
        segment = ~(fill | standalone | _SOF[marker]) & (marker != 0xDA) & (marker != 0xD9) & (marker != 0xD8)
        skip = todo[segment]
        pos[skip] += 2 + _be16(data, pos[skip] + 2)
        todo = todo[fill | standalone | segment]
    return width, height, ok


_HEADER_READERS = {"png": _png_sizes, "jpg": _jpeg_sizes}


def check_headers(parts: Parts, kind: str) -> None:
    """Raise DecodeError at the first image whose header does not declare 32x32 pixels (or cannot be
    read): nothing is decoded at a size the header chose (see the module docstring)."""
    read = _HEADER_READERS[kind]
    expected_h, expected_w = IMAGE_SHAPE_HWC[:2]
    start = 0
    for buffer, offsets, sizes in parts:
        if len(offsets):
            data = np.frombuffer(buffer, dtype=np.uint8)
            width, height, ok = read(data, offsets.astype(np.int64), sizes.astype(np.int64))
            bad = ~ok | (width != expected_w) | (height != expected_h)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                if not ok[i]:
                    cause = f"no readable {kind} header declaring its size; not decoded"
                else:
                    cause = (
                        f"its {kind} header declares {int(width[i])}x{int(height[i])} pixels; expected "
                        f"{expected_w}x{expected_h}; not decoded"
                    )
                raise DecodeError(start + i, cause)
        start += len(offsets)


def _decode_each(name: str, parts: Parts) -> torch.Tensor:
    check_headers(parts, "png" if name == "decode_png" else "jpg")
    op = _image_op(name)
    images = []
    for position, data in enumerate(_tensor_slices(parts)):
        try:
            images.append(op(data))
        except RuntimeError as exc:
            raise DecodeError(position, " ".join(str(exc).split())[:160]) from None
    return _stack_hwc(images)


Into = Callable[[np.ndarray, np.ndarray], None]  # (encoded image, its row of the batch): decodes one


def _into_batch(parts: Parts, kind: str, decode_one: Into) -> torch.Tensor:
    """One uint8 NHWC batch, each image decoded by `decode_one(encoded, row)` into its row (headers
    checked first); a decoder's error becomes a DecodeError at that image's position."""
    check_headers(parts, kind)
    n = sum(len(offsets) for _, offsets, _ in parts)
    batch = np.empty((n, *IMAGE_SHAPE_HWC), dtype=np.uint8)
    position = 0
    for buffer, offsets, sizes in parts:
        data = np.frombuffer(buffer, dtype=np.uint8)
        for o, s in zip(offsets.tolist(), sizes.tolist(), strict=True):
            try:
                decode_one(data[o : o + s], batch[position])
            except (ValueError, RuntimeError, TypeError) as exc:
                raise DecodeError(position, " ".join(str(exc).split())[:160]) from None
            position += 1
    return torch.from_numpy(batch)


def decode_jpeg_simplejpeg(parts: Parts) -> torch.Tensor:
    import simplejpeg

    def one(encoded: np.ndarray, row: np.ndarray) -> None:
        image = simplejpeg.decode_jpeg(encoded, colorspace="RGB", buffer=row)
        if image.shape != IMAGE_SHAPE_HWC:
            raise ValueError(f"decoded shape {tuple(image.shape)}, expected {IMAGE_SHAPE_HWC}")

    return _into_batch(parts, "jpg", one)


def _opencv(kind: str) -> Callable[[Parts], torch.Tensor]:
    """OpenCV's imdecode for `kind` images, in RGB order, copied into the batch."""

    def decode(parts: Parts) -> torch.Tensor:
        import cv2

        def one(encoded: np.ndarray, row: np.ndarray) -> None:
            try:
                image = cv2.imdecode(encoded, cv2.IMREAD_COLOR_RGB)
            except cv2.error as exc:
                raise ValueError(str(exc)) from None
            if image is None:
                raise ValueError(f"OpenCV cannot decode this {kind}")
            if image.shape != IMAGE_SHAPE_HWC:
                raise ValueError(f"decoded shape {tuple(image.shape)}, expected {IMAGE_SHAPE_HWC}")
            row[...] = image

        return _into_batch(parts, kind, one)

    return decode


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
    expected = (IMAGE_SHAPE_HWC[1], IMAGE_SHAPE_HWC[0])  # PIL's (width, height)
    for buffer, offsets, sizes in parts:
        for o, s in zip(offsets.tolist(), sizes.tolist(), strict=True):
            try:
                with Image.open(io.BytesIO(buffer[o : o + s])) as im:  # reads the header only
                    if im.size != expected:
                        raise DecodeError(
                            len(images),
                            f"its {im.format or 'image'} header declares {im.size[0]}x{im.size[1]} pixels; "
                            f"expected {expected[0]}x{expected[1]}; not decoded",
                        )
                    images.append(np.asarray(im.convert("RGB")))
            except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
                raise DecodeError(len(images), " ".join(str(exc).split())[:160]) from None
    return torch.from_numpy(np.stack(_stack(images, IMAGE_SHAPE_HWC)))


def decode_pil_checked(kind: str) -> Callable[[Parts], torch.Tensor]:
    """`decode_pil` for shards of `kind`, headers checked first as for the other decoders (PIL's own
    decompression-bomb limit, ~179M pixels, is far above what a 32x32 dataset can hold)."""

    def decode(parts: Parts) -> torch.Tensor:
        check_headers(parts, kind)
        return decode_pil(parts)

    return decode


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# (encoding, choice) -> decoder; "auto" is the measured fastest installed for that encoding.
_JPG_SIMPLEJPEG = Decoder("simplejpeg", "NHWC", decode_jpeg_simplejpeg, "simplejpeg")
_JPG_OPENCV = Decoder("opencv", "NHWC", _opencv("jpg"), "cv2")
_JPG_TORCHVISION = Decoder("torchvision", "NHWC", decode_jpeg_torchvision, "torchvision.io")
_PNG_OPENCV = Decoder("opencv", "NHWC", _opencv("png"), "cv2")
_PNG_TORCHVISION = Decoder("torchvision", "NHWC", decode_png_torchvision, "torchvision.io")
_JPG_AUTO = next(
    (d for d in (_JPG_SIMPLEJPEG, _JPG_OPENCV) if d.module and _installed(d.module)), _JPG_TORCHVISION
)
_PNG_AUTO = _PNG_OPENCV if _installed("cv2") else _PNG_TORCHVISION
DECODERS: dict[tuple[str, str], Decoder] = {
    ("raw", "auto"): Decoder("gather", "NHWC", decode_raw),
    ("raw", "gather"): Decoder("gather", "NHWC", decode_raw),
    ("raw", "numpy"): Decoder("gather", "NHWC", decode_raw),  # its former name, still accepted
    ("jpg", "auto"): _JPG_AUTO,
    ("jpg", "simplejpeg"): _JPG_SIMPLEJPEG,
    ("jpg", "opencv"): _JPG_OPENCV,
    ("jpg", "torchvision"): _JPG_TORCHVISION,
    ("jpg", "pil"): Decoder("pil", "NHWC", decode_pil_checked("jpg"), "PIL.Image"),
    ("png", "auto"): _PNG_AUTO,
    ("png", "opencv"): _PNG_OPENCV,
    ("png", "torchvision"): _PNG_TORCHVISION,
    ("png", "pil"): Decoder("pil", "NHWC", decode_pil_checked("png"), "PIL.Image"),
}


def decode_choices(encoding: str) -> list[str]:
    return [choice for enc, choice in DECODERS if enc == encoding]


def parse_labels(
    buffer: memoryview, offsets: np.ndarray, sizes: np.ndarray, classes: int | None = None
) -> tuple[np.ndarray, int]:
    """ASCII integer labels at `offsets` (`sizes` digits each), vectorised; (labels, first bad or -1).

    Bad: empty, more than MAX_LABEL_DIGITS digits (refused before summing, so nothing wraps), anything
    but digits, and (given `classes`) a value outside 0..classes-1. `label_problem` says which."""
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
    labels = (digits * powers).sum(axis=1)
    if classes is not None:
        outside = (labels < 0) | (labels >= classes)
        if outside.any():
            return labels, int(np.flatnonzero(outside)[0])
    return labels, -1


def label_problem(buffer: memoryview, offset: int, size: int, classes: int) -> str:
    """What is wrong with the label at `offset` that `parse_labels` refused, in one line."""
    data = bytes(buffer[offset : offset + min(size, 40)])
    shown = repr(data.decode("ascii", errors="replace")) + ("..." if size > 40 else "")
    accepted = f"expected a class index 0..{classes - 1}"
    if size < 1:
        return f"the .cls member is empty; {accepted}"
    if not data.isdigit():
        return f"the .cls member is not an integer (it holds {shown}); {accepted}"
    if size > MAX_LABEL_DIGITS:
        return f"the .cls member holds {shown}, {size} digits (at most {MAX_LABEL_DIGITS}); {accepted}"
    return f"label {int(data)} is outside 0..{classes - 1}"
