"""The counters every loader reports through `stats()`, in one type.

run.json's `counters` and the bench read these keys: bytes_read, requests, retries, cache_hits,
cache_misses, skipped, verified_bytes, unchanged_bytes (and, for loaders that prefetch over a network,
prefetch_depth).
`verified_bytes` counts the shard and batch-file bytes that were checked against the manifest's sha256
before use: next to `bytes_read` it shows a run that opted out of verification (`verify=false`), and it
adds up across readers and ranks like the other counters. `unchanged_bytes`: local shard bytes read
again, not hashed again, because the file was unchanged since it was (loaders.shards.LocalVerdicts);
verified plus unchanged is every shard byte read under `verify`. Reads of a local
dataset in place are counted too (`local_bytes`, `local_files`), so a local and a remote run of one
loader show the same volume of data. A loader whose readers run in other processes sums their
`LoaderStats` with `+`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol


class _Hits(Protocol):
    hits: int
    misses: int


@dataclass(frozen=True)
class LoaderStats:
    bytes_read: int = 0
    requests: int = 0
    retries: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    skipped: int = 0
    verified_bytes: int = 0
    unchanged_bytes: int = 0
    prefetch_depth: int | None = None  # readers' prefetch depths summed; None: the loader does not prefetch

    @classmethod
    def of(
        cls,
        counters: Any,
        cache: _Hits | None = None,
        *,
        local_bytes: int = 0,
        local_files: int = 0,
        skipped: int = 0,
        verified_bytes: int = 0,
        unchanged_bytes: int = 0,
        prefetch_depth: int | None = None,
    ) -> LoaderStats:
        """From a store's `Counters`, a `ShardCache` (or None), and what was read in place."""
        return cls(
            bytes_read=int(counters.bytes_read) + local_bytes,
            requests=int(counters.requests) + local_files,
            retries=int(getattr(counters, "retries", 0)),
            cache_hits=cache.hits if cache is not None else 0,
            cache_misses=cache.misses if cache is not None else 0,
            skipped=skipped,
            verified_bytes=verified_bytes,
            unchanged_bytes=unchanged_bytes,
            prefetch_depth=prefetch_depth,
        )

    def __add__(self, other: LoaderStats) -> LoaderStats:
        depth = (
            None
            if self.prefetch_depth is None and other.prefetch_depth is None
            else (self.prefetch_depth or 0) + (other.prefetch_depth or 0)
        )
        return LoaderStats(
            bytes_read=self.bytes_read + other.bytes_read,
            requests=self.requests + other.requests,
            retries=self.retries + other.retries,
            cache_hits=self.cache_hits + other.cache_hits,
            cache_misses=self.cache_misses + other.cache_misses,
            skipped=self.skipped + other.skipped,
            verified_bytes=self.verified_bytes + other.verified_bytes,
            unchanged_bytes=self.unchanged_bytes + other.unchanged_bytes,
            prefetch_depth=depth,
        )

    def as_dict(self) -> dict[str, int]:
        """The `stats()` dict: every counter, prefetch_depth only where the loader prefetches."""
        out = asdict(self)
        if out["prefetch_depth"] is None:
            del out["prefetch_depth"]
        return out
