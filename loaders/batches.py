"""A whole split in memory, read from the CIFAR python batches kept at every dataset root.

The torchvision baseline and the device-resident tensor loader both start from the split as one uint8
array. The split's batch files come from `loaders.localcopy.LocalFiles`: in place for a local dataset
root (after a size and sha256 check against the manifest; `verify=False` keeps the size check only);
for `s3://` / `cos://`, each copied whole (one GET,
resumed from the byte reached if the connection drops; feedrate.storage), verified by sha256, into the
dataset's directory of the cache (`cache_dir`, else a temporary one removed once the batches are
unpickled). The fetch is recorded as a `Download` (CSV type 10 / 11), as the seed did for its S3 and
IBM COS runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from feedrate.cifar import TEST_BATCH, TRAIN_BATCHES, read_batch
from feedrate.errors import FeedrateError
from feedrate.manifest import FileEntry
from loaders.base import Download
from loaders.localcopy import LocalFiles
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
