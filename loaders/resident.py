"""The ceiling reference: a whole split resident on the device as one uint8 tensor (airbench's way).

The split is read once from any storage URL (the CIFAR python batches at the dataset root; a remote
fetch is recorded as a type 10/11 row) and copied to the device. Every epoch then costs only tensor ops
on the device: a permutation, and per batch one gather that crops and flips, and one float conversion
with normalisation. No decode, no per-sample Python, no worker processes: what is left is the floor of
any loader's cost, against which the others are judged.

Augmentation has the baseline's semantics (RandomCrop(32, padding=4) with zero fill, horizontal flip
with p=0.5, normalise). To make the crop a single gather, the training split is stored once as a padded
canvas holding each image next to its mirror image (N x 40 x 80 x 3 uint8, 480 MB for CIFAR-10's
training set); `unfold` views every crop window of it without a copy, and a batch's windows are picked
by (sample, row offset, column offset in the plain or mirrored half). See `loaders.augment` for the
same idea on a batch that is not resident.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from loaders.augment import normalize
from loaders.base import CROP_PADDING, Download, LoaderConfig, batches_for
from loaders.batches import load_split
from loaders.options import BATCH_READER_OPTIONS, parse_options
from loaders.seeds import AUGMENT, ORDER, epoch_seed
from loaders.shards import open_dataset
from loaders.transfer import to_device


class TensorLoader:
    """Device-resident split; batches are gathered, cropped, flipped and normalised on the device."""

    def __init__(self, cfg: LoaderConfig) -> None:
        self.cfg = cfg
        self.options = parse_options("tensor", cfg.options, BATCH_READER_OPTIONS)
        self.verify: bool = self.options.get("verify", True)  # sha256 of the batch files (run.json)
        self.device = torch.device(cfg.device)
        self.decode_device = self.device.type
        self.root = open_dataset(cfg.data, endpoint_url=cfg.endpoint_url)
        t0 = time.perf_counter()
        arrays = load_split(self.root, cfg.split, cfg.cache_dir, self.options.get("net") or None, self.verify)
        self.prefetch_plan = arrays.fetch_plan
        images = to_device(torch.from_numpy(arrays.images), self.device)  # (N, 32, 32, 3) uint8
        self.labels = to_device(torch.from_numpy(arrays.labels), self.device)
        self._n = len(self.labels)
        pad = CROP_PADDING
        if cfg.train:
            n, h, w, c = images.shape
            hp, wp = h + 2 * pad, w + 2 * pad
            canvas = images.new_zeros((n, hp, 2 * wp, c))
            canvas[:, pad : pad + h, pad : pad + w] = images
            canvas[:, pad : pad + h, wp + pad : wp + pad + w] = images.flip(2)
            self._canvas = canvas
            self._windows = canvas.unfold(1, h, 1).unfold(2, w, 1)  # (N, rows, cols, C, H, W) view
            self._mirror_base = wp + 2 * pad
            del images
        else:
            self._images = images
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.downloads: list[Download] = arrays.downloads
        if self.downloads:  # the copy to the device is part of preparing the data in memory
            self.downloads[-1].duration = (self.downloads[-1].duration - self.downloads[-1].loading) + (
                time.perf_counter() - t0
            )
        self._stats = arrays.stats()
        self._epoch = 0
        # Ranks take every world_size-th sample of one shared permutation: disjoint, and together
        # the whole split.
        self.samples = len(range(cfg.rank, self._n, cfg.world_size))

    def __len__(self) -> int:
        return batches_for(self.samples, self.cfg.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def stats(self) -> dict[str, int]:
        return self._stats.as_dict()

    def close(self) -> None:
        """Free the resident split now (on a GPU, its memory goes back to the caching allocator)."""
        self._images = self._canvas = self._windows = None  # type: ignore[assignment]

    def _generator(self, stream: int) -> torch.Generator:
        """The epoch's generator for `stream`; the order is shared by every rank (each takes its part)."""
        gen = torch.Generator(device=self.device)
        rank = 0 if stream == ORDER else self.cfg.rank
        gen.manual_seed(epoch_seed(self.cfg.seed, self._epoch, rank, stream=stream))
        return gen

    def order(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, in iteration order."""
        if self.cfg.train:
            perm = torch.randperm(self._n, generator=self._generator(ORDER), device=self.device)
        else:
            perm = torch.arange(self._n, device=self.device)
        return perm[self.cfg.rank :: self.cfg.world_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.order()
        bs = self.cfg.batch_size
        if not self.cfg.train:
            for start in range(0, len(order), bs):
                idx = order[start : start + bs]
                yield normalize(self._images[idx], "NHWC"), self.labels[idx]
            return
        gen = self._generator(AUGMENT)
        span = 2 * CROP_PADDING + 1
        for start in range(0, len(order), bs):
            idx = order[start : start + bs]
            n = len(idx)
            offsets = torch.randint(0, span, (2, n), generator=gen, device=self.device)
            flip = torch.rand(n, generator=gen, device=self.device) < 0.5
            # A flipped crop at column dx is the mirrored half's window at 2*pad - dx.
            col = torch.where(flip, self._mirror_base - offsets[1], offsets[1])
            crops = self._windows[idx, offsets[0], col]  # (n, C, H, W) uint8: one gather
            yield normalize(crops, "NCHW"), self.labels[idx]
