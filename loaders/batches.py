"""A whole split in memory, read from the CIFAR python batches kept at every dataset root.

The torchvision baseline and the device-resident tensor loader both start from the split as one uint8
array. Where the batches come from:
- a local dataset root: read in place (after a size check against the manifest);
- `s3://` / `cos://`: each batch file of the split is fetched (one GET, resumed from the byte reached if
  the connection drops; feedrate.storage) into a cache directory (`cache_dir`, else a temporary one
  removed after loading) by the shared `ShardCache`, which checks size and sha256 against the manifest
  and reuses a cached copy only when both match; then the batches are unpickled. The fetch is recorded
  as a `Download` (CSV type 10 / 11), as the seed did for its S3 and IBM COS runs.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from feedrate import network
from feedrate.cifar import TEST_BATCH, TRAIN_BATCHES, read_batch
from feedrate.errors import FeedrateError
from feedrate.manifest import FileEntry
from loaders.base import Download
from loaders.shards import DatasetRoot, ShardCache, fetch_all, fetch_plan, local_path

SPLIT_FILES = {"train": TRAIN_BATCHES, "test": (TEST_BATCH,)}


@dataclass
class SplitArrays:
    """Images (N, 32, 32, 3) uint8 and labels (N,) int64 of one split, and how they were read."""

    images: np.ndarray
    labels: np.ndarray
    downloads: list[Download] = field(default_factory=list)
    cache: ShardCache | None = None
    local_bytes: int = 0
    local_files: int = 0
    fetch_plan: dict[str, object] = field(default_factory=lambda: {"concurrency": 1, "source": "local"})

    def stats(self, root: DatasetRoot) -> dict[str, int]:
        """Counters for run.json (reads are done once, up front)."""
        counters = root.store.counters
        return {
            "bytes_read": counters.bytes_read + self.local_bytes,
            "requests": counters.requests + self.local_files,
            "retries": getattr(counters, "retries", 0),
            "cache_hits": self.cache.hits if self.cache else 0,
            "cache_misses": self.cache.misses if self.cache else 0,
            "skipped": 0,
        }


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


def _local(root: DatasetRoot, entry: FileEntry) -> Path:
    """A batch file read in place, after a size check against the manifest."""
    path = local_path(root, entry.name)
    if path is None:
        raise FeedrateError(f"{root.url} is not on local disk")
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FeedrateError(f"{path} is missing; the manifest lists it") from None
    if size != entry.bytes:
        raise FeedrateError(f"{path} has {size} bytes; the manifest says {entry.bytes}")
    return path


def _concat(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def net_option(options: dict[str, object]) -> str | None:
    """The `net` option (a feedrate.network preset name), checked; None when not given."""
    name = str(options.get("net") or "")
    if not name:
        return None
    network.preset(name)  # an unknown name fails here, naming the accepted ones
    return name


def load_split(
    root: DatasetRoot, split: str, cache_dir: str | None = None, net: str | None = None
) -> SplitArrays:
    """The split's batches as arrays, checked against the manifest's sample count. Remote batch files
    are fetched several at once, as the link (`net` preset, else FEEDRATE_NET, else measured) asks."""
    expected = root.samples(split)  # a missing or empty split is a FeedrateError here
    entries = _entries(root, split)
    num_classes = len(root.manifest.class_names)
    if local_path(root, entries[0].name) is not None:
        paths = [_local(root, entry) for entry in entries]
        images, labels = _concat([read_batch(path, num_classes) for path in paths])
        result = SplitArrays(
            images, labels, local_bytes=sum(e.bytes for e in entries), local_files=len(entries)
        )
    else:
        start, t0 = time.time(), time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="feedrate-batches-") as scratch:
            cache = ShardCache(root.store, cache_dir or scratch)
            plan = fetch_plan(root, [e.bytes for e in entries], net)
            files = [(e.name, e.bytes, e.sha256) for e in entries]
            paths = fetch_all(cache, files, int(plan["concurrency"]))  # type: ignore[call-overload]
            fetched = time.perf_counter() - t0
            images, labels = _concat([read_batch(path, num_classes) for path in paths])
        download = Download(
            split=split,
            start=start,
            loading=fetched,
            duration=time.perf_counter() - t0,
            samples=len(labels),
        )
        result = SplitArrays(images, labels, downloads=[download], cache=cache, fetch_plan=plan)
    if len(result.labels) != expected:
        raise FeedrateError(
            f"the {split} batches of {root.url} hold {len(result.labels)} samples; "
            f"the manifest says {expected}"
        )
    return result
