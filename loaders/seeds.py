"""One seed function for every loader: (seed, epoch, rank, worker, stream) -> a seed.

Every random choice a loader makes in an epoch (the sample order, the crop and flip draws) comes from a
generator seeded here, so an epoch is a function of the run's seed and where it is read: the same
(seed, epoch, rank, worker) gives the same epoch on any machine, and different epochs, ranks, workers
and streams get independent draws (numpy's SeedSequence mixes the parts; a linear formula such as
seed * K + epoch makes seed 0 epoch K the same as seed 1 epoch 0).

`stream` keeps apart the draws one reader makes for different purposes: ORDER (shuffling), AUGMENT
(crops and flips) and UNITS (the epoch's shard order, shared by every rank and reader); SAMPLES seeds the
per-sample augmentation table of an epoch (loaders.augment.EpochDraws), shared by every reader. An
order shared by every rank is seeded with the rank left at 0.
"""

from __future__ import annotations

import numpy as np

ORDER = 0
AUGMENT = 1
UNITS = 2
SAMPLES = 3
MASK = (1 << 64) - 1


def epoch_seed(
    seed: int, epoch: int, rank: int = 0, worker: int = 0, stream: int = ORDER, bits: int = 63
) -> int:
    """A `bits`-bit non-negative seed (63 fits torch.Generator.manual_seed, 31 fits DALI's seed)."""
    if not 1 <= bits <= 64:
        raise ValueError(f"bits={bits}; accepted: 1..64")
    parts = [int(p) & MASK for p in (seed, epoch, rank, worker, stream)]
    state = np.random.SeedSequence(parts).generate_state(2, dtype=np.uint32)
    return ((int(state[0]) << 32) | int(state[1])) >> (64 - bits)
