"""Peers: other libraries' data paths over the same shards, measured in the same run as reference rows.

A ratio to the torchvision baseline says how far a loader is from the slowest plain path; a ratio to a
peer says whether feedrate beats what a user gets from a library directly. Two peers, each built the way
the library's own documentation builds it, with the bench's augmentation (zero-pad 4 + random 32x32
crop, horizontal flip, normalise), batch and worker count:

- `peer:dali-plain`: DALI's CPU pipeline, `fn.readers.webdataset` over the shards and shardgen's `.idx`
  files, `fn.decoders.image` (raw: the 3,072 bytes reshaped to HWC), pad + crop + flip + normalise,
  `workers` threads, the DALI PyTorch iterator. The yardstick feedrate's DALI loader must meet; it is
  written here, not from `loaders/dali_pipe.py`, so that a change to the loader cannot move it.
- `peer:webdataset`: `webdataset.WebDataset(shards)`, decoded per sample to PIL, the torchvision
  transforms per sample, a torch DataLoader with `workers` processes.

They are not feedrate loaders (never in `loaders.BACKENDS`) and read local shards only. Each imports its
library when it is built, so the bench runs without either; `unavailable()` says why one cannot run.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from feedrate.errors import FeedrateError
from feedrate.manifest import MANIFEST_NAME, Manifest
from feedrate.storage import redact_url
from loaders.base import CIFAR10_MEAN, CIFAR10_STD, CROP_PADDING

DALI_PLAIN = "peer:dali-plain"
WEBDATASET = "peer:webdataset"
PEERS = (DALI_PLAIN, WEBDATASET)
# The package each peer imports (when built), and the feedrate loader it is the yardstick of.
LIBRARY = {DALI_PLAIN: "nvidia.dali", WEBDATASET: "webdataset"}
MEASURES = {DALI_PLAIN: "dali", WEBDATASET: "wds"}
SIDE = 32  # CIFAR-10's images: raw samples are SIDE x SIDE x 3 bytes
LABEL_WIDTH = 8  # a `.cls` member's ASCII digits, zero-padded to this many bytes inside the DALI pipeline
SHUFFLE_BUFFER = 1_000  # samples, for both peers (DALI's reader fills 1,024 by default; wds's docs use 1,000)


def is_peer(name: str) -> bool:
    """Whether `name` is a peer's (e.g. "peer:webdataset"), not a feedrate loader's."""
    return name.startswith("peer:")


def unavailable(name: str) -> str | None:
    """Why peer `name` cannot run here (its library is not installed), or None; nothing is imported."""
    if name not in LIBRARY:
        raise FeedrateError(f"unknown peer {name}; accepted: {', '.join(PEERS)}")
    module = LIBRARY[name]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package (nvidia) raises instead of returning None
        found = False
    return None if found else f"{name} needs the {module.split('.')[-1]} package, which is not installed"


def _train_shards(data: str) -> tuple[str, list[Path], list[Path]]:
    """The dataset's encoding and its training shards with their `.idx` files, from its manifest."""
    root = Path(data.removeprefix("file://"))
    manifest = Manifest.from_json((root / MANIFEST_NAME).read_text(), str(root / MANIFEST_NAME))
    shards = manifest.splits["train"].shards
    return manifest.encoding, [root / s.name for s in shards], [root / s.index.name for s in shards]


def ascii_labels(padded: torch.Tensor) -> torch.Tensor:
    """int64 labels from a (batch, width) uint8 tensor of ASCII digits followed by padding (any byte that
    is not a digit ends a label), parsed for the whole batch at once rather than per sample."""
    digits = padded.long() - ord("0")
    leading = ((digits >= 0) & (digits <= 9)).long().cumprod(dim=1)  # 1 over the leading digit run
    count = leading.sum(dim=1, keepdim=True)
    place = (count - 1 - torch.arange(padded.shape[1])).clamp(min=0)
    return (digits * leading * torch.pow(10, place)).sum(dim=1)


class _Peer:
    """What bench.measure reads from a loader, for a library that has none of feedrate's counters."""

    decode_device = "cpu"
    prefetch_plan = None
    downloads: tuple[Any, ...] = ()  # nothing is fetched: the peers read local shards in place

    def set_epoch(self, epoch: int) -> None:
        """Peers shuffle as their library does, not by feedrate's epoch seed."""

    def stats(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        """Nothing to release beyond what the library frees itself."""


class DaliPlain(_Peer):
    """The plain DALI CPU pipeline over the shards: reader, decoder, pad + crop, flip + normalise."""

    def __init__(self, data: str, batch_size: int, workers: int, seed: int) -> None:
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        encoding, tars, indexes = _train_shards(data)
        # RandomCrop(32, padding=4)'s nine offsets per axis, as fractions of the padded frame's slack
        offsets = [i / (2 * CROP_PADDING) for i in range(2 * CROP_PADDING + 1)]

        @pipeline_def(batch_size=batch_size, num_threads=max(1, workers), device_id=None, seed=seed)
        def pipeline():
            data, label = fn.readers.webdataset(
                paths=[str(p) for p in tars],
                index_paths=[str(p) for p in indexes],
                ext=[encoding, "cls"],
                missing_component_behavior="error",
                random_shuffle=True,
                initial_fill=SHUFFLE_BUFFER,
                name="reader",
            )
            if encoding == "raw":
                image = fn.reshape(data, shape=[SIDE, SIDE, 3], layout="HWC")
            else:
                image = fn.decoders.image(data, device="cpu", output_type=types.RGB)
            framed = SIDE + 2 * CROP_PADDING  # a centred crop larger than the image: 4 zero pixels around
            image = fn.crop(image, crop=(framed, framed), out_of_bounds_policy="pad", fill_values=0)
            image = fn.crop_mirror_normalize(
                image,
                crop=(SIDE, SIDE),
                crop_pos_x=fn.random.uniform(values=offsets),
                crop_pos_y=fn.random.uniform(values=offsets),
                mirror=fn.random.coin_flip(),
                mean=[255 * m for m in CIFAR10_MEAN],
                std=[255 * s for s in CIFAR10_STD],
                dtype=types.FLOAT,
                output_layout="CHW",
            )
            label = fn.pad(label, axes=[0], shape=[LABEL_WIDTH], fill_value=0)
            return image, label

        pipe = pipeline()
        pipe.build()
        self._batches = DALIGenericIterator(
            [pipe],
            ["images", "labels"],
            reader_name="reader",
            last_batch_policy=LastBatchPolicy.DROP,
            auto_reset=True,
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for (batch,) in self._batches:
            yield batch["images"], ascii_labels(batch["labels"])

    def close(self) -> None:
        del self._batches


class WebDatasetPeer(_Peer):
    """The WebDataset library's own reader: tar members to samples, PIL decode and torchvision per
    sample, batched by a torch DataLoader with `workers` processes."""

    def __init__(self, data: str, batch_size: int, workers: int, seed: int) -> None:
        import numpy as np
        import webdataset
        from PIL import Image
        from torch.utils.data import DataLoader
        from torchvision import transforms

        encoding, tars, _ = _train_shards(data)

        def raw_to_pil(key: str, data: bytes) -> Image.Image | None:
            """A webdataset decoder handler for the `.raw` members (HWC bytes); None passes others on."""
            if not key.endswith(".raw"):
                return None
            return Image.fromarray(np.frombuffer(data, np.uint8).reshape(SIDE, SIDE, 3))

        # The classic CIFAR-10 chain, spelled out here (not loaders.baseline's) so the yardstick is fixed.
        augment = transforms.Compose(
            [
                transforms.RandomCrop(SIDE, padding=CROP_PADDING),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD),
            ]
        )
        dataset = (
            webdataset.WebDataset(
                [str(p) for p in tars], shardshuffle=len(tars), seed=seed, empty_check=False
            )
            .shuffle(SHUFFLE_BUFFER)
            .decode(raw_to_pil, "pil")
            .to_tuple(encoding, "cls")
            .map_tuple(augment, int)
        )
        self._loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from self._loader


def build_peer(name: str, data: str, *, batch_size: int, workers: int, device: str, seed: int = 0) -> _Peer:
    """Peer `name` over the local dataset at `data`; a missing library is a FeedrateError saying so."""
    reason = unavailable(name)
    if reason:
        raise FeedrateError(reason)
    if "://" in data and not data.startswith("file://"):
        raise FeedrateError(f"peers read local shards; got {redact_url(data)}")
    if device != "cpu":
        raise FeedrateError(f"peers run on the CPU; got device {device!r}")
    make = DaliPlain if name == DALI_PLAIN else WebDatasetPeer
    try:
        return make(data, batch_size, workers, seed)
    except ImportError as exc:
        raise FeedrateError(f"{name} could not import its library: {exc}") from None
