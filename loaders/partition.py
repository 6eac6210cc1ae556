"""Who reads what: an epoch's samples cut into units, dealt to ranks and to reader threads.

Every epoch must yield each sample of the split exactly once, for any number of ranks and readers and
any shard count >= 1, and the ranks' parts must differ by at most one sample (DDP runs as many steps as
its smallest rank: a bigger difference is dropped). So:

1. The epoch's shard order (`shard_order`): for training a permutation of the split's shards drawn from
   (seed, epoch) alone (loaders.seeds, stream UNITS) -- the same on every rank, for every worker count;
   for validation the manifest's order.
2. The epoch's samples are those shards' samples concatenated in that order, each shard's in its stored
   order (the shuffle buffer mixes them later; the shards were shuffled when written). A resumed epoch
   (loaders.resume) uses only the remainder: each shard's samples not consumed yet (`remainder_rows`),
   concatenated the same way.
3. Of those N samples, rank r of R takes the contiguous range [r*N//R, (r+1)*N//R) (`rank_units`): parts
   differ by at most one sample, and at most R-1 shards are cut, at the ranks' boundaries. A unit is
   one shard's piece of a rank's range: a sample range of it, or (a resumed epoch) a sorted subset of
   its samples.
4. Within a rank, units are dealt to its readers in turn, in the epoch's order (`reader_units`); a reader
   left without a unit yields nothing. Where ranged reads are allowed (`split=True`: verification off)
   and a rank holds fewer units than readers, each unit is cut into equal sample ranges first, so no
   reader idles and no byte is read twice.

How a unit is read (loaders.shards.ShardFetcher): a whole shard with one GET; a part of one with one
ranged GET of just its bytes -- except under verification (the default), since a part cannot be checked
against the whole shard's sha256: then each rank (or reader) that holds a part reads the whole shard and
slices it, so a cut shard costs one extra GET per extra holder (counted in stats()["part_reads"]).

So a rank's part of an epoch, and its `len()`, depend on (seed, epoch, world size, rank) and, in a
resumed epoch, the consumed set; a reader's units also on the reader count.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from loaders.seeds import UNITS, epoch_seed


@dataclass(frozen=True)
class Unit:
    """Samples [first, stop) of shard number `shard` (an index into the split's shard list), or only
    `rows` of them (a sorted subset: a resumed epoch's remainder)."""

    shard: int
    first: int
    stop: int
    whole: bool  # the unit is the entire shard (read it whole: verifiable, cacheable)
    rows: tuple[int, ...] | None = None  # the unit's samples when not all of [first, stop)

    @property
    def samples(self) -> int:
        return self.stop - self.first if self.rows is None else len(self.rows)

    def positions(self) -> np.ndarray:
        """Its samples as positions counted from `first` (int64, ascending)."""
        if self.rows is None:
            return np.arange(self.stop - self.first, dtype=np.int64)
        return np.asarray(self.rows, dtype=np.int64) - self.first


def unit_of(shard: int, rows: np.ndarray, shard_samples: int) -> Unit:
    """The unit holding samples `rows` (ascending, not empty) of a shard: a range when they are one."""
    first, stop = int(rows[0]), int(rows[-1]) + 1
    if stop - first == len(rows):
        return Unit(shard, first, stop, whole=(first == 0 and stop == shard_samples))
    return Unit(shard, first, stop, whole=False, rows=tuple(rows.tolist()))


def shard_order(shards: int, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    """The epoch's shard order: drawn from (seed, epoch) when shuffling, else stored order."""
    if not shuffle:
        return np.arange(shards)
    return np.random.default_rng(epoch_seed(seed, epoch, stream=UNITS)).permutation(shards)


def remainder_rows(shard_samples: Sequence[int], consumed: np.ndarray) -> list[np.ndarray]:
    """Per shard, its samples (rows in the shard) not set in `consumed` (a bitmap over the split's
    sample numbers, shards in manifest order)."""
    out, start = [], 0
    for n in shard_samples:
        out.append(np.flatnonzero(~consumed[start : start + n]))
        start += n
    return out


def rank_units(
    shard_samples: Sequence[int],
    order: Sequence[int],
    rank: int,
    world_size: int,
    rows: Sequence[np.ndarray] | None = None,
) -> list[Unit]:
    """Rank `rank`'s units: its contiguous range of the samples of the shards in `order` (each shard's
    `rows`, or all of it), in that order (see the module docstring)."""
    counts = [len(rows[k]) if rows is not None else shard_samples[k] for k in order]
    total = sum(counts)
    lo, hi = rank * total // world_size, (rank + 1) * total // world_size
    units, at = [], 0
    for shard, n in zip(order, counts, strict=True):
        a, b = max(lo, at) - at, min(hi, at + n) - at
        at += n
        if b <= a:
            if at >= hi:
                break
            continue
        shard = int(shard)
        if rows is None:
            units.append(Unit(shard, a, b, whole=(a == 0 and b == shard_samples[shard])))
        else:
            units.append(unit_of(shard, rows[shard][a:b], shard_samples[shard]))
    return units


def cut(unit: Unit, parts: int, shard_samples: int) -> list[Unit]:
    """`unit` as up to `parts` units of (nearly) equal sample counts, in order."""
    rows = unit.positions() + unit.first
    cuts = [len(rows) * p // parts for p in range(parts + 1)]
    return [unit_of(unit.shard, rows[a:b], shard_samples) for a, b in itertools.pairwise(cuts) if b > a]


def reader_units(
    units: Sequence[Unit], readers: int, shard_samples: Sequence[int], split: bool
) -> list[list[Unit]]:
    """The units each of `readers` reads, in order: dealt in turn; with `split` (ranged reads allowed)
    cut first when there are fewer units than readers (see the module docstring)."""
    readers = max(1, readers)
    order = list(units)
    if split and 0 < len(order) < readers:
        parts = -(-readers // len(order))
        order = [piece for u in order for piece in cut(u, parts, shard_samples[u.shard])]
    return [order[r::readers] for r in range(readers)]
