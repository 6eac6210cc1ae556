"""Shard access shared by the shard-reading loaders (WebDataset, DALI, tensor).

- `open_dataset(url)`: the storage root and its manifest, checked once.
- `ShardRef`: one shard of a split as the manifest describes it (name, samples, bytes, sha256, index).
- `ShardCache`: whole shards copied from any store into a local directory, atomically, verified by size
  and sha256 against the manifest; a partial or corrupt cached file is fetched again. Local datasets
  need no cache: `local_path` answers with the file in place.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

from feedrate.errors import FeedrateError
from feedrate.manifest import Manifest, load_manifest
from feedrate.storage import LocalStore, Store, open_store


class ShardError(FeedrateError):
    """A shard that is missing, truncated or does not match its manifest entry."""


@dataclass(frozen=True)
class ShardRef:
    """A shard of one split: what the manifest promises about it."""

    name: str
    samples: int
    bytes: int
    sha256: str
    index_name: str
    index_bytes: int
    index_sha256: str


@dataclass
class DatasetRoot:
    """An opened dataset: its store and validated manifest."""

    store: Store
    manifest: Manifest

    @property
    def url(self) -> str:
        return self.store.url

    def shards(self, split: str) -> list[ShardRef]:
        if split not in self.manifest.splits:
            have = ", ".join(self.manifest.splits) or "none"
            raise FeedrateError(f"{self.url} has no split {split!r} (it has: {have})")
        entry = self.manifest.splits[split]
        if entry.samples < 1:
            raise FeedrateError(f"split {split!r} of {self.url} is empty")
        return [
            ShardRef(s.name, s.samples, s.bytes, s.sha256, s.index.name, s.index.bytes, s.index.sha256)
            for s in entry.shards
        ]

    def samples(self, split: str) -> int:
        return sum(s.samples for s in self.shards(split))


def open_dataset(url: str, endpoint_url: str | None = None) -> DatasetRoot:
    """Open the dataset at `url` (a path, file://, s3:// or cos://) and read its manifest."""
    store = open_store(url, endpoint_url=endpoint_url)
    return DatasetRoot(store, load_manifest(store))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ShardCache:
    """Whole shards (and their index files) from `store` in a local directory, verified on entry.

    A file already in the cache counts as a hit only when its size and sha256 match the manifest;
    anything else is fetched again (a miss). Thread-safe: concurrent fetches of one name are serialised.
    """

    def __init__(self, store: Store, cache_dir: str | Path) -> None:
        self.store = store
        self.dir = Path(cache_dir)
        self.hits = 0
        self.misses = 0
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._verified: set[str] = set()

    def _lock(self, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(name, threading.Lock())

    def _valid(self, path: Path, size: int, sha256: str) -> bool:
        if str(path) in self._verified:
            return True
        if not path.is_file() or path.stat().st_size != size:
            return False
        if sha256_file(path) != sha256:
            return False
        self._verified.add(str(path))
        return True

    def fetch(self, name: str, size: int, sha256: str) -> Path:
        """The local path of a verified copy of `name`, fetching it when needed."""
        path = self.dir / name
        with self._lock(name):
            if self._valid(path, size, sha256):
                self.hits += 1
                return path
            self.misses += 1
            self._verified.discard(str(path))
            self.store.get_file(name, path)
            if not self._valid(path, size, sha256):
                path.unlink(missing_ok=True)
                raise ShardError(
                    f"{self.store.url_for(name)} does not match the manifest (size {size}, sha256 "
                    f"{sha256[:12]}...) after a fresh download"
                )
            return path

    def shard(self, ref: ShardRef) -> Path:
        return self.fetch(ref.name, ref.bytes, ref.sha256)

    def index(self, ref: ShardRef) -> Path:
        return self.fetch(ref.index_name, ref.index_bytes, ref.index_sha256)


def local_path(root: DatasetRoot, name: str) -> Path | None:
    """The file itself when the dataset is on local disk, else None."""
    if isinstance(root.store, LocalStore):
        return root.store.path(name)
    return None
