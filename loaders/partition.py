"""Who reads what: a split's shards cut into units, dealt to ranks and to DataLoader workers.

Every epoch must yield each sample of the split exactly once, for any number of ranks and workers and
any shard count >= 1. So the unit of work is a sample range of one shard:

- enough shards (at least one per reader, readers = world_size x max(workers, 1)): one unit per shard,
  read with one GET;
- fewer shards than readers: each shard is cut into `ceil(readers / shards)` contiguous sample ranges,
  each read with one ranged GET of just its bytes (found from the shard's index), so no reader idles
  and no byte is read twice.

Ranks take fixed, disjoint slices of the unit list (unit i goes to rank i mod world_size), so a rank's
sample count, and `len()`, is the same every epoch. Within a rank, the unit order is shuffled per epoch
(training) and dealt round-robin to the workers; a worker left without a unit yields nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from loaders.seeds import UNITS, epoch_seed


@dataclass(frozen=True)
class Unit:
    """Samples [first, stop) of shard number `shard` (an index into the split's shard list)."""

    shard: int
    first: int
    stop: int
    whole: bool  # the unit is the entire shard (read it whole: verifiable, cacheable)

    @property
    def samples(self) -> int:
        return self.stop - self.first


def split_units(shard_samples: Sequence[int], readers: int) -> list[Unit]:
    """The split's units, shard by shard: whole shards, or equal sample ranges when shards are few."""
    readers = max(1, readers)
    parts = 1 if len(shard_samples) >= readers else -(-readers // len(shard_samples))
    units = []
    for shard, n in enumerate(shard_samples):
        cuts = [n * p // parts for p in range(parts + 1)]
        units += [Unit(shard, a, b, whole=(a == 0 and b == n)) for a, b in itertools.pairwise(cuts) if b > a]
    return units


def rank_units(shard_samples: Sequence[int], workers: int, rank: int, world_size: int) -> list[Unit]:
    """This rank's units: the same every epoch, disjoint from every other rank's."""
    units = split_units(shard_samples, world_size * max(1, workers))
    return units[rank::world_size]


def worker_units(
    units: Sequence[Unit], worker: int, workers: int, epoch: int, seed: int, shuffle: bool
) -> list[Unit]:
    """The units worker `worker` of `workers` reads this epoch, in order (shuffled per epoch by seed)."""
    order = list(units)
    if shuffle:
        perm = np.random.default_rng(epoch_seed(seed, epoch, stream=UNITS)).permutation(len(order))
        order = [order[i] for i in perm]
    return order[worker :: max(1, workers)]
