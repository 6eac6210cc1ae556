"""Shard access shared by the shard-reading loaders (WebDataset, DALI, tensor).

- `open_dataset(url)`: the storage root and its manifest, checked once.
- `ShardRef`: one shard of a split as the manifest describes it (name, samples, bytes, sha256, index).
- `ShardCache`: whole shards copied from any store into a local directory, atomically, verified by size
  and sha256 against the manifest; a partial or corrupt cached file is fetched again. One layout for
  every loader: `cache_dir/<dataset key>/<file name>`, the key derived from the manifest
  (`dataset_key`), so two datasets sharing a cache directory never overwrite each other's files, and
  every loader reading one dataset shares one copy. Local datasets need no cache: `local_path` answers
  with the file in place.
- `ShardIndex` / `parse_index`: where each sample's members lie inside a shard, from its DALI index file,
  so a loader can slice samples out of one buffer instead of walking tar headers per member.
- `ShardFetcher`: a shard (or a byte range of one) as one in-memory buffer, in one read: the file in
  place, a verified cached copy, or one GET streamed into the buffer (sha256 checked as it arrives when
  asked to).
- `fetch_all`: many files copied into a `ShardCache` at once, as many GETs in flight as the link's
  bandwidth-delay product asks for (feedrate.network.fetch_concurrency), for the loaders that copy a
  whole split before they start (DALI, the CIFAR-batch readers).
- `first_bad_sample`: what is wrong with a local shard, naming the sample: for messages when a reader
  that cannot say (DALI's) fails on it.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from feedrate import network
from feedrate.errors import FeedrateError
from feedrate.files import inside
from feedrate.manifest import Manifest, load_manifest
from feedrate.shardformat import ShardError, ShardIndex, TruncatedShard, parse_index
from feedrate.storage import LocalStore, RetryPolicy, Store, open_store
from loaders.stats import LoaderStats


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


def dataset_key(root: DatasetRoot) -> str:
    """The name of a dataset's directory in a cache: its encoding and a hash of its manifest.

    The same manifest gives the same key wherever it is read from (a DALI run and a wds run, s3:// and
    cos:// copies of one bucket share a copy); any change to the data changes a shard's sha256 in the
    manifest, hence the key."""
    digest = hashlib.sha256(root.manifest.to_json().encode()).hexdigest()[:16]
    return f"{root.manifest.encoding}-{digest}"


def open_dataset(url: str, endpoint_url: str | None = None, retry: RetryPolicy | None = None) -> DatasetRoot:
    """Open the dataset at `url` (a path, file://, s3:// or cos://) and read its manifest."""
    store = open_store(url, endpoint_url=endpoint_url, retry=retry)
    return DatasetRoot(store, load_manifest(store))


class ShardCache:
    """Whole files of dataset `root` (shards, index files, CIFAR batches) in `cache_dir/<dataset key>/`,
    verified on entry.

    A file already in the cache counts as a hit only when its size and sha256 match the manifest
    (hashed again unless unchanged since its hash matched, by LocalVerdicts' rule); anything else is
    fetched again (a miss). Thread-safe: concurrent fetches of one name are serialised.
    Names come from the manifest (someone's bucket): each one is checked to stay inside the directory.
    """

    def __init__(self, root: DatasetRoot, cache_dir: str | Path) -> None:
        self.store = root.store
        self.dir = Path(cache_dir) / dataset_key(root)
        self.hits = 0
        self.misses = 0
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        # the cached files whose sha256 matched, trusted while unchanged (LocalVerdicts' rule)
        self._verdicts = LocalVerdicts()

    def path(self, name: str) -> Path:
        """Where `name` is cached; a name that would land outside the cache is a ShardError."""
        try:
            return inside(self.dir, name)
        except ValueError as exc:
            raise ShardError(f"the manifest of {self.store.url} names a file {exc}") from None

    def _lock(self, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(name, threading.Lock())

    def _valid(self, path: Path, size: int, sha256: str) -> bool:
        """Whether the cached file has the manifest's size and sha256: hashed through its descriptor,
        unless the verdicts trust it unchanged (its path goes to a reader that reads it later)."""
        at_ns = time.time_ns()
        try:
            stream = open(path, "rb")  # noqa: SIM115 - closed below
        except OSError:
            return False
        with stream:
            before = LocalVerdicts.signature(stream)
            if before is None or before[2] != size:
                return False
            if self._verdicts.trusted(str(path), before):
                return True
            actual = hashlib.file_digest(stream, "sha256").hexdigest()
            after = LocalVerdicts.signature(stream)
        if actual != sha256:
            self._verdicts.forget(str(path))
            return False
        self._verdicts.record(str(path), before, after, at_ns)
        return True

    def _read_valid(self, path: Path, size: int, sha256: str) -> bytearray | None:
        """The cached file's bytes when its size and sha256 match, else None (hashed unless the
        verdicts trust it unchanged: LocalVerdicts.read)."""
        try:
            stream = open(path, "rb")  # noqa: SIM115 - closed below
        except OSError:
            return None
        with stream:
            try:
                return self._verdicts.read(str(path), stream, size, sha256, str(path))[0]
            except ShardError:  # a bad copy is a miss: fetched again
                return None

    def read_through(self, name: str, size: int, sha256: str, fetch: Callable[[], bytearray]) -> bytearray:
        """The bytes of `name`: a verified cached copy (a hit), else `fetch()`ed, verified and stored.

        Nothing unverified is ever stored or returned; the file appears under its name atomically.
        """
        path = self.path(name)
        with self._lock(name):
            data = self._read_valid(path, size, sha256)
            if data is not None:
                self.hits += 1
                return data
            self.misses += 1
            data = fetch()
            check_bytes(data, size, sha256, self.store.url_for(name))
            LocalStore(str(self.dir)).write_bytes(name, data)
            return data

    def fetch(self, name: str, size: int, sha256: str) -> Path:
        """The local path of a verified copy of `name`, fetching it when needed."""
        path = self.path(name)
        with self._lock(name):
            if self._valid(path, size, sha256):
                self.hits += 1
                return path
            self.misses += 1
            self._verdicts.forget(str(path))
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


def fetch_plan(root: DatasetRoot, sizes: Sequence[int], net: str | None = None) -> dict[str, object]:
    """How many GETs to run at once to copy files of `sizes` bytes from `root`'s store, and why.

    The link is the `net` preset, else FEEDRATE_NET's, else measured from the GETs made so far (the
    manifest's: latency only), else assumed same-region (feedrate.network.link_for)."""
    found = network.link_for(root.store, net)
    if found is None or not sizes:
        return {"concurrency": 1, "source": "local"}
    link, source = found
    typical = int(np.median(sizes))
    return {
        "concurrency": network.fetch_concurrency(link, typical, len(sizes)),
        "source": source,
        "link": link.as_dict(),
        "file_bytes": typical,
    }


def fetch_all(cache: ShardCache, files: Sequence[tuple[str, int, str]], concurrency: int) -> list[Path]:
    """Verified local copies of `files` ((name, bytes, sha256) each), `concurrency` GETs at a time, in
    the order given. On the first failure (or an interrupt) the fetches not yet begun are cancelled, and
    it is raised once those under way have ended, so nothing writes into the cache after it returns."""
    if concurrency <= 1 or len(files) <= 1:
        return [cache.fetch(*f) for f in files]
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="fetch")
    try:
        futures = [pool.submit(cache.fetch, *f) for f in files]
        return [future.result() for future in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def local_path(root: DatasetRoot, name: str) -> Path | None:
    """The file itself when the dataset is on local disk, else None."""
    if isinstance(root.store, LocalStore):
        return root.store.path(name)
    return None


def check_bytes(data: bytes | bytearray, size: int, sha256: str, url: str) -> None:
    """Raise ShardError naming `url` unless `data` has the manifest's size and sha256."""
    if len(data) != size:
        raise ShardError(f"{url} has {len(data)} bytes; the manifest says {size} (truncated or replaced)")
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise corrupt(url, actual, sha256)


def read_exact(stream: Any, url: str, size: int, sha256: str | None, whole: bool) -> bytearray:
    """`size` bytes of an open `stream` into a buffer, hashed on the way when `sha256`: a ShardError
    naming `url` when they do not match, when the stream is longer (`whole`), or (TruncatedShard, with
    what arrived) when it ends early."""
    data = bytearray(size)
    view = memoryview(data)
    digest = hashlib.sha256() if sha256 else None
    filled = 0
    while filled < len(data):
        n = stream.readinto(view[filled:])
        if not n:
            break
        if digest:
            digest.update(view[filled : filled + n])
        filled += n
    longer = whole and filled == len(data) and bool(stream.read(1))
    if longer:
        raise ShardError(f"{url}: got more than {filled} of {len(data)} bytes (replaced shard)")
    if filled != len(data):
        raise TruncatedShard(
            f"{url}: got {filled} of {len(data)} bytes (truncated or replaced shard)", data, filled
        )
    if digest and sha256 and digest.hexdigest() != sha256:
        raise corrupt(url, digest.hexdigest(), sha256)
    return data


def corrupt(url: str, actual: str, expected: str) -> ShardError:
    return ShardError(
        f"{url} is corrupt: sha256 {actual[:12]}... does not match the manifest's {expected[:12]}..."
    )


class LocalVerdicts:
    """The local shard files a loader has verified, by their stat signature, shared by its readers.

    Reading a local shard again (the next epoch) re-hashed bytes that had not changed: sha256 was 3.3-3.6
    of the wds loader's 23-25 CPU us per raw image here, 14% of all its work. So a local file whose
    sha256 matched is trusted on later reads while its signature (device, inode, size, mtime, ctime),
    taken through the open file before the read and again after it, is the one it had when it was
    hashed. A write(2) to the file changes its mtime and ctime (ctime cannot be set back by a user), a
    file renamed into its place has another inode: either way the shard is hashed again, and a
    mismatch is the same error as before. As git does for its index ("racy" entries), a file changed
    less than RACY_NS before it was hashed is not trusted: a write within the same timestamp tick
    could leave the signature as it was. What is not caught, after the first read: a change below
    the file system (a disk returning other bytes, a raw write to the device), a second write through
    a shared mmap of the file (Linux updates the times only when a clean page is first written: seen
    here on ext4 and tmpfs), and a file system that reports times a writer controls (FUSE, a network
    mount with a skewed clock). `rehash=true` (wds option) hashes every read instead. The verdicts
    live in memory with the loader, so every process hashes every file it reads at least once; remote
    shards are hashed on every GET; ShardCache checks its copies by this same rule. The dali
    loader checks its local shards once, when it is built, and never again.
    """

    RACY_NS = 1_000_000_000

    def __init__(self) -> None:
        self._good: dict[str, tuple[int, ...]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def signature(stream: Any) -> tuple[int, ...] | None:
        """What changes when the file open as `stream` does, read through its descriptor (a stat by
        path could see another file than the one read: one renamed in and out between them); None
        when it cannot be had."""
        try:
            st = os.fstat(stream.fileno())
        except (OSError, AttributeError, ValueError):
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def trusted(self, name: str, signature: tuple[int, ...] | None) -> bool:
        with self._lock:
            return signature is not None and self._good.get(name) == signature

    def record(
        self, name: str, before: tuple[int, ...] | None, after: tuple[int, ...] | None, at_ns: int
    ) -> None:
        """`name` hashed right: trusted from now on if it did not change while it was read (`before`
        == `after`) and had not changed within RACY_NS before `at_ns` (when `before` was taken)."""
        if before is None or before != after or max(before[3], before[4]) > at_ns - self.RACY_NS:
            return
        with self._lock:
            self._good[name] = before

    def forget(self, name: str) -> None:
        with self._lock:
            self._good.pop(name, None)

    def read(self, name: str, stream: Any, size: int, sha256: str, url: str) -> tuple[bytearray, bool]:
        """The `size` bytes of the open file `stream` (`name`), and whether they were hashed: not when it
        is trusted unchanged before and after this read (both signatures through its descriptor), else
        checked against `sha256` (read_exact's ShardError naming `url` when they differ) and trusted
        from now on if `record` allows."""
        at_ns = time.time_ns()
        before = self.signature(stream)
        trusted = self.trusted(name, before)
        try:
            data = read_exact(stream, url, size, None if trusted else sha256, True)
            after = self.signature(stream)
            if trusted and after == before:
                return data, False
            if trusted:  # changed while it was read: these bytes are checked now
                self.forget(name)
                check_bytes(data, size, sha256, url)
        except ShardError:
            self.forget(name)
            raise
        self.record(name, before, after, at_ns)
        return data, True


class ShardFetcher:
    """Shards as in-memory buffers, each in one read, with counters for run.json.

    - local dataset: the file in place (no cache needed);
    - remote with a cache directory: the verified cached copy, else one GET whose bytes are verified
      (size + sha256), stored atomically and used at once (no second read);
    - remote without a cache: one GET streamed into the buffer, resumed from the byte reached if the
      connection drops (see feedrate.storage).
    With `verify` (the default), a whole shard's sha256 is computed as its bytes arrive, from local disk
    as from a store, and checked before any sample of it is used. A byte range (a part of a shard split
    between ranks or readers, a resumed epoch's remainder) is one ranged GET; it cannot be checked
    against the whole shard's sha256, so under `verify` (or with a cache) the whole shard is read and
    sliced instead, counted in `part_reads`. `bytes_read` counts bytes from the dataset's store; cached
    copies count as cache hits; `verified_bytes` the shard bytes checked. `verdicts`: a local file
    hashed once is trusted while it is unchanged (LocalVerdicts); `unchanged_bytes` counts those reads.
    """

    def __init__(
        self,
        root: DatasetRoot,
        cache_dir: str | Path | None = None,
        verify: bool = True,
        verdicts: LocalVerdicts | None = None,
    ) -> None:
        self.root = root
        self.verify = verify
        self.local = isinstance(root.store, LocalStore)
        self.cache = ShardCache(root, cache_dir) if cache_dir and not self.local else None
        self.verdicts = verdicts if self.local and verify else None
        self.verified_bytes = 0
        self.unchanged_bytes = 0  # local bytes read again unchanged since hashed (not hashed again)
        self.part_reads = 0  # whole shards read (and verified) for a part of them
        self._count_lock = threading.Lock()  # shards are read in prefetch threads

    def _verified(self, data: bytearray) -> bytearray:
        with self._count_lock:
            self.verified_bytes += len(data)
        return data

    def read(self, ref: ShardRef, start: int = 0, end: int | None = None) -> memoryview:
        """Bytes [start, end) of shard `ref` (the whole shard by default)."""
        end = ref.bytes if end is None else end
        if start == 0 and end == ref.bytes:
            return memoryview(self._whole(ref))
        if self.cache is not None or self.verify:
            with self._count_lock:
                self.part_reads += 1
            return memoryview(self._whole(ref))[start:end]
        return memoryview(self._get(ref.name, start, end, None))

    def _whole(self, ref: ShardRef) -> bytearray:
        if self.cache is not None:  # a cached copy is always verified (its sha256 decides a hit)
            return self._verified(
                self.cache.read_through(
                    ref.name,
                    ref.bytes,
                    ref.sha256,
                    lambda: self._get(ref.name, 0, ref.bytes, None, whole=True),
                )
            )
        if self.verdicts is not None:
            return self._local_verified(ref, self.verdicts)
        if self.verify:
            return self._verified(self._get(ref.name, 0, ref.bytes, ref.sha256, whole=True))
        return self._get(ref.name, 0, ref.bytes, None, whole=True)

    def _local_verified(self, ref: ShardRef, verdicts: LocalVerdicts) -> bytearray:
        """A local shard, hashed unless `verdicts` trusts it unchanged (LocalVerdicts.read)."""
        url = self.root.store.url_for(ref.name)
        with self.root.store.open_read(ref.name, 0, None) as stream:
            data, hashed = verdicts.read(ref.name, stream, ref.bytes, ref.sha256, url)
        if hashed:
            return self._verified(data)
        with self._count_lock:
            self.unchanged_bytes += len(data)
        return data

    def _get(self, name: str, start: int, end: int, sha256: str | None, whole: bool = False) -> bytearray:
        """One read of bytes [start, end) of `name` into a buffer, hashed on the way when `sha256`.

        `whole`: the object should be exactly `end` bytes; it is read with a plain GET (not a ranged
        one) and a longer object is an error as much as a shorter one.
        """
        with self.root.store.open_read(name, start, None if whole else end) as stream:
            return read_exact(stream, self.root.store.url_for(name), end - start, sha256, whole)

    def read_index(self, ref: ShardRef, lenient: bool = False) -> ShardIndex:
        """The parsed index of `ref`, always verified (it is small and decides every slice); `lenient`
        lets samples that lack a member through, marked (see `parse_index`)."""
        fetch = lambda: self._get(ref.index_name, 0, ref.index_bytes, None, whole=True)  # noqa: E731
        if self.cache is not None:
            data = self.cache.read_through(ref.index_name, ref.index_bytes, ref.index_sha256, fetch)
        else:
            data = fetch()
            check_bytes(data, ref.index_bytes, ref.index_sha256, self.root.store.url_for(ref.index_name))
        text = data.decode("ascii", errors="replace")
        return parse_index(text, ref.name, self.root.manifest.encoding, lenient=lenient)

    def stats(self, skipped: int = 0, prefetch_depth: int | None = None) -> LoaderStats:
        """This process's reads (and `skipped`, `prefetch_depth` from the reader that owns it)."""
        return LoaderStats.of(
            self.root.store.counters,
            self.cache,
            skipped=skipped,
            verified_bytes=self.verified_bytes,
            unchanged_bytes=self.unchanged_bytes,
            prefetch_depth=prefetch_depth,
        )


def first_bad_sample(tar: Path, idx: Path, encoding: str, classes: int) -> str | None:
    """`SHARD: sample KEY: what is wrong` for the first bad sample of a local shard, or None when every
    sample is sound: a member missing, a label that is not a class number, an image that does not decode.

    It reads and decodes the whole shard, so it is for error messages only: DALI reports a sample
    without a label by index line and an undecodable image by batch position, and neither names it.
    """
    from loaders.decode import DECODERS, DecodeError, label_problem, parse_labels

    try:
        index = parse_index(idx.read_text(encoding="ascii", errors="replace"), str(tar), encoding)
        data = memoryview(bytearray(tar.read_bytes()))  # writable: decoders view it as a tensor
    except ShardError as exc:
        return str(exc)
    except OSError:
        return None
    for i, key in enumerate(index.keys):
        end = max(index.image_offset[i] + index.image_size[i], index.label_offset[i] + index.label_size[i])
        if end > len(data):
            return f"{tar}: sample {key}: its index points past the end of the shard"
        offset, size = int(index.label_offset[i]), int(index.label_size[i])
        _, bad = parse_labels(data, index.label_offset[i : i + 1], index.label_size[i : i + 1], classes)
        if bad >= 0:
            return f"{tar}: sample {key}: {label_problem(data, offset, size, classes)}"
        try:
            DECODERS[(encoding, "auto")]([(data, index.image_offset[i : i + 1], index.image_size[i : i + 1])])
        except DecodeError as exc:
            return f"{tar}: sample {key}: cannot decode ({exc.cause})"
    return None
