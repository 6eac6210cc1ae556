"""A whole split in memory, read from the CIFAR python batches kept at every dataset root.

The torchvision baseline and the device-resident tensor loader both start from the split as one uint8
array. The split's batch files come from `loaders.localcopy.LocalFiles`: in place for a local dataset
root (after a size and sha256 check against the manifest; `verify=False` keeps the size check only);
for `s3://` / `cos://`, each copied whole (one GET,
resumed from the byte reached if the connection drops; feedrate.storage), verified by sha256, into the
dataset's directory of the cache (`cache_dir`, else a temporary one removed once the batches are
unpickled). The fetch is recorded as a `Download` (CSV type 10 / 11), as the seed did for its S3 and
IBM COS runs.

Both read the split map-style, by row, so they share one epoch order and its resume state
(`SplitOrder`): a sample's id in loaders.resume's bitmap is its row in these arrays.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from feedrate.cifar import TEST_BATCH, TRAIN_BATCHES, read_batch
from feedrate.errors import FeedrateError
from feedrate.manifest import FileEntry
from loaders.base import Download
from loaders.localcopy import LocalFiles
from loaders.resume import Progress, check, remaining
from loaders.seeds import ORDER, epoch_seed
from loaders.shards import DatasetRoot
from loaders.stats import LoaderStats

SPLIT_FILES = {"train": TRAIN_BATCHES, "test": (TEST_BATCH,)}


@dataclass
class SplitArrays:
    """Images (N, 32, 32, 3) uint8 and labels (N,) int64 of one split, and how they were read."""

    images: np.ndarray
    labels: np.ndarray
    files: LocalFiles  # how the batch files were read (closed: the arrays are all that is kept)
    downloads: list[Download] = field(default_factory=list)

    @property
    def fetch_plan(self) -> dict[str, object]:
        return self.files.plan

    def stats(self) -> LoaderStats:
        """Counters for run.json (reads are done once, up front)."""
        return self.files.stats()


def _entries(root: DatasetRoot, split: str) -> list[FileEntry]:
    manifest = root.manifest
    by_name = {entry.name: entry for entry in manifest.source_batches}
    entries = []
    for name in SPLIT_FILES[split]:
        full = f"{manifest.batch_dir}/{name}"
        if full not in by_name:
            raise FeedrateError(f"the manifest of {root.url} lists no {full}")
        entries.append(by_name[full])
    return entries


def _concat(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def load_split(
    root: DatasetRoot, split: str, cache_dir: str | None = None, net: str | None = None, verify: bool = True
) -> SplitArrays:
    """The split's batches as arrays, checked against the manifest's sample count and (`verify`) sha256.
    Remote batch files are fetched several at once, as the link (`net` preset, else FEEDRATE_NET, else
    measured) asks."""
    expected = root.samples(split)  # a missing or empty split is a FeedrateError here
    entries = _entries(root, split)
    num_classes = len(root.manifest.class_names)
    t0 = time.perf_counter()
    with LocalFiles(root, cache_dir, prefix="feedrate-batches-", verify=verify) as files:
        paths = files.paths([(e.name, e.bytes, e.sha256) for e in entries], net)
        images, labels = _concat([read_batch(path, num_classes) for path in paths])
    result = SplitArrays(images, labels, files)
    if files.started is not None:
        duration = time.perf_counter() - t0
        result.downloads.append(Download(split, files.started, files.loading, duration, len(labels)))
    if len(result.labels) != expected:
        raise FeedrateError(
            f"the {split} batches of {root.url} hold {len(result.labels)} samples; "
            f"the manifest says {expected}"
        )
    return result


class SplitOrder:
    """The epoch order of a split read whole (map-style), this rank's part of it, and where the epoch is.

    The order of epoch e is one permutation of the split's rows 0..N-1 (identity when not shuffled, for
    validation), drawn on the CPU by a generator seeded `epoch_seed(seed, e, stream=ORDER)` (rank 0: one
    order for every rank). It depends on (seed, epoch, N) alone. Ranks are dealt it in turn: rank r takes
    positions r, r+R, r+2R, ... (parts differ by at most one sample, no repeats). Worker counts play no
    part. After t steps of full batches of B on every rank the consumed samples are exactly the order's
    first t*B*R, so the rest of the epoch is the order without the consumed set (`loaders.resume.
    remaining`), and dealing that rest in turn again gives rank r exactly what it would have read next:
    order[t*B*R + r :: R] == order[r::R][t*B:]. The consumed bitmap therefore continues the epoch exactly
    when the counts are unchanged, and deals the remainder evenly when they are not; no `exact` data is
    needed (state_dict's `exact` is None).

    Lifecycle: `set_epoch` chooses the epoch; `begin()` starts an iteration and returns this rank's ids
    in iteration order (numpy int64, on the host: the consumer marks them without asking a device);
    `mark(ids)` records a batch as it is handed out; `finish()` says the last batch was handed out.
    `load_state_dict` makes that epoch's next iteration serve the remainder (`samples` then counts this
    rank's part of it) until an iteration of it has handed out its last batch or another epoch is set.
    """

    def __init__(
        self,
        loader: str,
        split: str,
        total: int,
        seed: int,
        shuffle: bool,
        rank: int,
        world_size: int,
        dataset: str = "",
    ) -> None:
        self.loader, self.split, self.total, self.seed, self.shuffle = loader, split, total, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.dataset = dataset  # loaders.shards.dataset_key: a state of another dataset is refused
        self.progress = Progress(total, dataset)
        self.epoch = 0
        self._carried: np.ndarray | None = None  # the loaded state's consumed set, while it is pending
        self._carried_epoch = 0  # and its epoch
        self._cached: tuple[int, bool, np.ndarray] | None = None  # (epoch, resumed, part)

    # -- the order ------------------------------------------------------------------------------------
    def order(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s order of the whole split (every rank's)."""
        if not self.shuffle:
            return np.arange(self.total, dtype=np.int64)
        generator = torch.Generator()
        generator.manual_seed(epoch_seed(self.seed, epoch, stream=ORDER))
        return torch.randperm(self.total, generator=generator).numpy()

    def part(self) -> np.ndarray:
        """This rank's ids for the current epoch in iteration order: of the remainder while a loaded
        state is pending, else of the whole order."""
        resumed = self._carried is not None
        if self._cached is None or self._cached[:2] != (self.epoch, resumed):
            ids = remaining(self.order(self.epoch), self._carried)[self.rank :: self.world_size]
            self._cached = (self.epoch, resumed, ids)
        return self._cached[2]

    @property
    def samples(self) -> int:
        """len(part()), without drawing the order."""
        left = self.total - (0 if self._carried is None else int(self._carried.sum()))
        return len(range(self.rank, left, self.world_size))

    # -- an epoch's iteration -------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration reads; another epoch than a loaded state's ends that state."""
        if self._carried is not None and epoch != self._carried_epoch:
            self._carried = None
        self.epoch = epoch
        self.progress.start(epoch, self._carried)

    def begin(self) -> np.ndarray:
        """Start an iteration of the current epoch: the consumed set restarts (from the loaded state's
        while it is pending); this rank's ids in iteration order."""
        self.progress.start(self.epoch, self._carried)
        return self.part()

    def mark(self, ids: np.ndarray) -> None:
        self.progress.mark(ids)

    def finish(self) -> None:
        """The iteration handed out its last batch: a loaded state is no longer pending (the same epoch
        iterated again is whole)."""
        self._carried = None

    # -- the state ------------------------------------------------------------------------------------
    def state_dict(self, workers: int) -> dict[str, Any]:
        """The loader state (loaders.resume): the current epoch and the ids handed out in it."""
        return self.progress.state(self.loader, self.split, self.seed, workers, self.world_size, exact=None)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Serve only what `state` has not consumed when its epoch is read (validated: loaders.resume.check;
        `exact` is not needed, see the class docstring). The loader is left at that epoch."""
        consumed = check(state, self.loader, self.split, self.seed, self.total, self.dataset)
        self._carried, self._carried_epoch = consumed, state["epoch"]
        self.set_epoch(state["epoch"])
