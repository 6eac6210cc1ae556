"""Network conditions: named link presets, and prefetch depths chosen from the bandwidth-delay product.

A loopback S3 endpoint answers in microseconds; a real object store answers in tens of milliseconds and
caps each connection's bandwidth. `Link` describes a network path in four figures, the ones the
shaping proxy (rig.netproxy) imposes and the ones the loaders plan their prefetching with:

- `latency_s`: time to first byte of every request (request sent -> first response byte);
- `jitter_s`: spread of that latency (each request draws uniformly from latency +- jitter);
- `conn_bps`: bytes/s one connection can carry (TCP window / RTT, or the server's per-request cap);
- `total_bps`: bytes/s all connections share (the NIC, or the home link).

Presets (`PRESETS`) name real situations; README.md gives the figures' sources.

Why prefetching hides latency: a reader that needs D bytes/s of shards of S bytes, each of which takes
T = latency + S / conn_bps to arrive, must have D x T bytes in flight -- the bandwidth-delay product --
that is ceil(D x T / S) shard fetches at once. More buys nothing; fewer leaves the reader waiting. When
the link's total bandwidth is below D, no depth helps: the link is the bottleneck, and a depth that
fills it (total_bps x T / S) is all that is worth holding in memory.
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass

from feedrate.errors import FeedrateError

MB = 1_000_000  # link figures are in decimal megabytes per second (1 MB/s = 8 Mbit/s)
NET_ENV = "FEEDRATE_NET"  # a preset name: the link the loaders plan for (and `make s3-up` shapes)
# The demand a loader plans for when it cannot know the consumer's speed: images/s across all readers,
# above what the fastest loader here feeds one GPU (DALI and wds top out near 30-40k img/s on 2-16 cores).
DEFAULT_DEMAND_IMG_S = 50_000.0
MAX_DEPTH = 16  # shard fetches in flight per reader, at most
MAX_FETCH_CONCURRENCY = 32  # whole-file GETs at once when a loader copies a split up front
PREFETCH_MEMORY = 512 * MB  # shard bytes a reader may hold in flight
MIN_TIMED_BODY = 1 << 20  # bodies that tell a connection's bandwidth (see `measured`)


@dataclass(frozen=True)
class Link:
    """A network path between the loader and the object store (see the module docstring)."""

    name: str
    latency_s: float
    jitter_s: float
    conn_bps: float  # math.inf: no per-connection cap
    total_bps: float  # math.inf: no shared cap
    about: str = ""

    def __post_init__(self) -> None:
        if self.latency_s < 0 or self.jitter_s < 0 or self.jitter_s > self.latency_s:
            raise FeedrateError(
                f"link {self.name!r}: latency {self.latency_s} s and jitter {self.jitter_s} s; "
                "accepted: 0 <= jitter <= latency"
            )
        if not (self.conn_bps > 0 and self.total_bps > 0):
            raise FeedrateError(f"link {self.name!r}: bandwidths must be > 0")

    @property
    def shaped(self) -> bool:
        """False for the unshaped loopback: nothing to impose."""
        return bool(self.latency_s or math.isfinite(self.conn_bps) or math.isfinite(self.total_bps))

    def fetch_seconds(self, size: int) -> float:
        """Expected time for one GET of `size` bytes on an otherwise idle link."""
        return self.latency_s + size / min(self.conn_bps, self.total_bps)

    def describe(self) -> str:
        def rate(bps: float) -> str:
            return "unlimited" if math.isinf(bps) else f"{bps / MB:g} MB/s"

        return (
            f"{self.name}: first byte {self.latency_s * 1e3:g} ms +- {self.jitter_s * 1e3:g} ms, "
            f"{rate(self.conn_bps)} per connection, {rate(self.total_bps)} in all"
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "latency_ms": round(self.latency_s * 1e3, 3),
            "jitter_ms": round(self.jitter_s * 1e3, 3),
            "conn_MBps": None if math.isinf(self.conn_bps) else round(self.conn_bps / MB, 3),
            "total_MBps": None if math.isinf(self.total_bps) else round(self.total_bps / MB, 3),
        }


LOOPBACK = Link("loopback", 0.0, 0.0, math.inf, math.inf, "no shaping: the local endpoint as it is")
PRESETS: dict[str, Link] = {
    link.name: link
    for link in (
        LOOPBACK,
        Link(
            "same-region",
            0.020,
            0.010,
            90 * MB,
            1_250 * MB,
            "compute and bucket in one cloud region: tens of ms to first byte, ~90 MB/s per "
            "connection, a 10 Gbit/s NIC",
        ),
        Link(
            "cross-region",
            0.090,
            0.015,
            40 * MB,
            625 * MB,
            "bucket on another continent (~75 ms RTT): TCP-window-bound connections, 5 Gbit/s "
            "leaving the region",
        ),
        Link(
            "home",
            0.040,
            0.010,
            12.5 * MB,
            12.5 * MB,
            "a 100 Mbit/s home link to a cloud region",
        ),
    )
}


def preset(name: str) -> Link:
    """The preset called `name`; an unknown name is a one-line error listing the accepted ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise FeedrateError(f"unknown network preset {name!r}; accepted: {', '.join(PRESETS)}") from None


def from_env(environ: dict[str, str] | None = None) -> Link | None:
    """The preset named by FEEDRATE_NET, or None when it is unset or empty."""
    name = (os.environ if environ is None else environ).get(NET_ENV, "").strip()
    return preset(name) if name else None


Timing = tuple[float, int, float, float, float]  # see `measured`


def measured(samples: list[Timing], window: int = 16, peak_conn_bps: float = 0.0) -> Link | None:
    """A link estimated from timed GETs: (seconds to first byte, body bytes, seconds reading the body,
    time of the first body byte, time of the last; one clock).

    - latency: the median time to first byte;
    - per connection: the fastest body of 1 MiB or more, of the last `window` or ever (`peak_conn_bps`,
      the store's record: fetches that share a full link each look slow, and only a body that had the
      link to itself shows what one connection gets). Smaller bodies are over in a few ms, where fixed
      per-read costs and a connection not yet up to speed make the link look several times slower than
      it is (index reads of ~100 KB through the same-region preset measured ~7 MB/s of its 90). Without
      any: unlimited, which plans for latency alone;
    - shared: the bytes of those bodies over the time at least one of them was arriving. With one GET at
      a time that is the per-connection rate; with several it is what they got together. Planning with
      it probes like TCP's slow start: on a link with room, k fetches bring k times the bytes, the
      estimate rises and the next plan goes deeper, until the demand is met; on a full link the
      estimate stays at the link's rate and so does the depth (no fetches that only split it).
    """
    if not samples:
        return None
    latency = statistics.median(s[0] for s in samples)
    big = [s for s in samples if s[1] >= MIN_TIMED_BODY and s[2] > 0][-window:]
    if not big:
        return Link("measured", latency, 0.0, math.inf, math.inf, f"from {len(samples)} timed GETs")
    conn = max(peak_conn_bps, *(s[1] / s[2] for s in big))
    busy, reach = 0.0, -math.inf  # the union of the bodies' [first byte, last byte] intervals
    for _, _, _, begin, end in sorted(big, key=lambda s: s[3]):
        if end > reach:
            busy += end - max(begin, reach)
            reach = end
    total = sum(s[1] for s in big) / busy if busy > 0 else math.inf
    return Link("measured", latency, 0.0, conn, max(total, 1.0), f"from {len(samples)} timed GETs")


def prefetch_depth(
    link: Link,
    shard_bytes: int,
    demand_bps: float,
    readers: int = 1,
    limit: int = MAX_DEPTH,
) -> int:
    """Shard fetches each of `readers` should keep in flight to be fed `demand_bps` bytes/s in all.

    ceil(D x T / S) per reader with D = min(demand, total bandwidth) / readers and T the time one
    shard takes to arrive; at least 1, at most `limit` and what PREFETCH_MEMORY holds.
    """
    if shard_bytes <= 0:
        return 1
    rate = min(demand_bps, link.total_bps) / max(1, readers)
    depth = math.ceil(rate * link.fetch_seconds(shard_bytes) / shard_bytes - 1e-9)
    memory_cap = max(1, PREFETCH_MEMORY // shard_bytes)
    return max(1, min(depth, limit, memory_cap))


def fetch_concurrency(link: Link, file_bytes: int, files: int, default: int = 8) -> int:
    """GETs at once to copy `files` files of about `file_bytes` each as fast as the link allows.

    Enough to fill the shared bandwidth (total x T / S); when that is unknown (unlimited), `default`.
    """
    if files <= 1:
        return 1
    if math.isinf(link.total_bps) or file_bytes <= 0:
        want = default
    else:
        want = math.ceil(link.total_bps * link.fetch_seconds(file_bytes) / file_bytes - 1e-9)
    return max(1, min(want, files, MAX_FETCH_CONCURRENCY))


def link_for(store: object, named: str | None = None) -> tuple[Link, str] | None:
    """The link a loader plans for when reading `store` (a feedrate.storage.Store), and where it came
    from: a preset `named` by the loader's `net` option, else by FEEDRATE_NET, else measured from the
    store's timed GETs so far, else assumed same-region. None for a local store (no network)."""
    if getattr(store, "is_local", False):
        return None
    if named:
        return preset(named), "option"
    told = from_env()
    if told is not None:
        return told, NET_ENV
    link = measured(list(getattr(store, "timings", ())))
    if link is not None:
        return link, "measured"
    return PRESETS["same-region"], "assumed"
