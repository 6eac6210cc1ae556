"""A split's files on local disk before a loader starts: in place, or copied whole first.

The loaders that cannot read a remote store themselves (DALI's webdataset reader, the CIFAR-batch
readers) start from local files. `LocalFiles` gives them those files:
- a local dataset: the files in place, after a size and (with `verify`, the default) sha256 check
  against the manifest (counted as reads, so stats() show the same volume for local and remote data):
  a flipped byte in a batch file or shard is an error naming the file, as it is for a remote copy;
- `s3://` / `cos://`: every file copied whole, one GET each, several at once as the link asks
  (`fetch_plan`), verified by size and sha256 (`ShardCache`), into the one cache layout,
  `cache_dir/<dataset key>/<file name>`, so loaders reading one dataset share one copy and two
  datasets never overwrite each other. Without a cache directory the copy goes to a temporary
  directory that `close()` removes -- and so does any exception while the copy is made, an interrupt
  included (train.py turns SIGTERM into KeyboardInterrupt): a stopped run leaves no stray copy of a
  dataset behind in /tmp.
The fetch is timed (`started`, `loading`) for the loader's type 10/11 Download row. `verify=False` only
drops the sha256 check of files read in place: a copy is always verified (the cache judges a hit by
it). The bytes checked are counted (`stats().verified_bytes`).

A file read in place is hashed, then read again by its loader: one who can rewrite the dataset's
directory between the two reads is not defended against (a local dataset is the user's own disk).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from feedrate.errors import FeedrateError
from feedrate.files import sha256_of
from loaders.shards import DatasetRoot, ShardCache, corrupt, fetch_all, fetch_plan, local_path
from loaders.stats import LoaderStats

FileSpec = tuple[str, int, str]  # (name, bytes, sha256) as the manifest lists a file


class LocalFiles:
    """Local paths of a dataset's files (see the module docstring); a context manager."""

    def __init__(
        self, root: DatasetRoot, cache_dir: str | Path | None, prefix: str = "feedrate-", verify: bool = True
    ) -> None:
        self.root = root
        self.verify = verify
        self.cache: ShardCache | None = None
        self.local_bytes = 0
        self.local_files = 0
        self.verified_bytes = 0
        self.plan: dict[str, object] = {"concurrency": 1, "source": "local"}
        self.started: float | None = None  # Unix time the copy began (None: nothing was copied)
        self.loading = 0.0  # seconds the copy took
        self._scratch: Path | None = None
        if not root.store.is_local:
            if not cache_dir:
                self._scratch = Path(tempfile.mkdtemp(prefix=prefix))
            self.cache = ShardCache(root, cache_dir or self._scratch)  # type: ignore[arg-type]

    @property
    def copied(self) -> bool:
        """Whether the files were copied (a remote dataset), rather than read in place."""
        return self.cache is not None

    def paths(self, files: Sequence[FileSpec], net: str | None = None) -> list[Path]:
        """Local paths of `files`, in order. `net`: the feedrate.network preset to plan the copy's
        concurrency for (else FEEDRATE_NET's, else measured; the choice is left in `plan`)."""
        if self.cache is None:
            return [self._in_place(name, size, sha256) for name, size, sha256 in files]
        self.started, t0 = time.time(), time.perf_counter()
        try:
            self.plan = fetch_plan(self.root, [size for _, size, _ in files], net)
            paths = fetch_all(self.cache, files, int(self.plan["concurrency"]))  # type: ignore[call-overload]
        except BaseException:
            self.close()
            raise
        self.loading = time.perf_counter() - t0
        self.verified_bytes += sum(size for _, size, _ in files)  # ShardCache.fetch checked each one
        return paths

    def _in_place(self, name: str, size: int, sha256: str) -> Path:
        path = local_path(self.root, name)
        assert path is not None, "only a local dataset is read in place"
        try:
            found = path.stat().st_size
        except FileNotFoundError:
            raise FeedrateError(f"{path} is missing; the manifest of {self.root.url} lists it") from None
        if found != size:
            raise FeedrateError(f"{path} has {found} bytes; the manifest says {size}")
        if self.verify:
            actual = sha256_of(path)
            if actual != sha256:
                raise corrupt(str(path), actual, sha256)
            self.verified_bytes += size
        self.local_bytes += size
        self.local_files += 1
        return path

    def stats(self, skipped: int = 0) -> LoaderStats:
        return LoaderStats.of(
            self.root.store.counters,
            self.cache,
            local_bytes=self.local_bytes,
            local_files=self.local_files,
            skipped=skipped,
            verified_bytes=self.verified_bytes,
        )

    def close(self) -> None:
        """Remove a temporary copy (a cache directory is kept: that is what it is for)."""
        scratch, self._scratch = self._scratch, None
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)

    def __enter__(self) -> LocalFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
