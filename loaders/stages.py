"""The generator stages a shard reader chains, each short, with one error policy: raise, naming the
shard and the sample.

    units ─► load_unit ─► prefetched ─► drawn ─► decoded ─► transformed
             (one read)   (a thread    (shuffle  (uint8     (augment or
                          ahead)       buffer)   batches)   normalise)

Samples are never Python objects of their own: a loaded unit is one buffer plus index arrays, the
shuffle buffer is two integer arrays, and each stage works a batch at a time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from loaders.augment import augment, normalize
from loaders.decode import DecodeError, Decoder, parse_labels
from loaders.partition import Unit
from loaders.shards import ShardError, ShardFetcher, ShardIndex, ShardRef


@dataclass
class LoadedUnit:
    """A unit's bytes in memory, with its labels parsed: samples are sliced out of `data`."""

    url: str  # the shard's URL, for messages
    index: ShardIndex
    first: int  # the unit's first sample in the shard
    stop: int
    data: memoryview  # shard bytes from offset `base`
    base: int
    labels: np.ndarray  # int64, one per sample of the unit

    @property
    def samples(self) -> int:
        return self.stop - self.first

    def part(self, positions: np.ndarray) -> tuple[memoryview, np.ndarray, np.ndarray]:
        """(buffer, offsets, sizes) of the images at unit positions `positions`."""
        rows = positions + self.first
        return self.data, self.index.image_offset[rows] - self.base, self.index.image_size[rows]

    def key(self, position: int) -> str:
        return self.index.keys[self.first + position]


def load_unit(
    unit: Unit, ref: ShardRef, index: ShardIndex, fetcher: ShardFetcher, classes: int
) -> LoadedUnit:
    """Read a unit's bytes (one read) and parse its labels; errors name the shard and the sample."""
    url = fetcher.root.store.url_for(ref.name)
    base, end = (0, ref.bytes) if unit.whole else index.span(unit.first, unit.stop)
    data = fetcher.read(ref, base, end)
    rows = slice(unit.first, unit.stop)
    ends = np.maximum(
        index.image_offset[rows] + index.image_size[rows], index.label_offset[rows] + index.label_size[rows]
    )
    if ends.size and int(ends.max()) - base > len(data):
        raise ShardError(f"{url}: its index points past the end of the shard (index and shard disagree)")
    labels, bad = parse_labels(data, index.label_offset[rows] - base, index.label_size[rows])
    if bad >= 0:
        raise ShardError(f"{url}: sample {index.keys[unit.first + bad]}: the .cls member is not an integer")
    outside = np.flatnonzero((labels < 0) | (labels >= classes))
    if outside.size:
        i = int(outside[0])
        raise ShardError(
            f"{url}: sample {index.keys[unit.first + i]}: label {labels[i]} is outside 0..{classes - 1}"
        )
    return LoadedUnit(url, index, unit.first, unit.stop, data, base, labels)


def prefetched(
    items: Iterable[Any], load: Callable[[Any], Any], pool: ThreadPoolExecutor, depth: int
) -> Iterator:
    """`load(item)` for each item, in order, with up to `depth` loads running ahead in `pool`."""
    pending: deque[Future] = deque()
    for item in items:
        pending.append(pool.submit(load, item))
        if len(pending) > depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


Draw = list[tuple[LoadedUnit, np.ndarray]]  # one batch: (unit, positions in it) groups


def drawn(
    loaded: Iterable[LoadedUnit], batch: int, buffer: int, rng: np.random.Generator | None
) -> Iterator[Draw]:
    """Batches drawn at random from a buffer of >= `buffer` samples (in order when `rng` is None).

    The buffer is two arrays (unit number, position) rather than a Python object per sample; a unit's
    bytes are dropped as soon as its last sample has been drawn.
    """
    units: list[LoadedUnit | None] = []
    left: list[int] = []
    owner = np.zeros(0, dtype=np.int64)
    position = np.zeros(0, dtype=np.int64)
    for unit in loaded:
        units.append(unit)
        left.append(unit.samples)
        owner = np.concatenate([owner, np.full(unit.samples, len(units) - 1)])
        position = np.concatenate([position, np.arange(unit.samples)])
        while len(owner) >= buffer + batch:
            owner, position, draw = _take(units, left, owner, position, batch, rng)
            yield draw
    while len(owner):
        owner, position, draw = _take(units, left, owner, position, batch, rng)
        yield draw


def _take(
    units: list[LoadedUnit | None],
    left: list[int],
    owner: np.ndarray,
    position: np.ndarray,
    batch: int,
    rng: np.random.Generator | None,
) -> tuple[np.ndarray, np.ndarray, Draw]:
    k = min(batch, len(owner))
    picked = np.arange(k) if rng is None else rng.choice(len(owner), size=k, replace=False)
    keep = np.ones(len(owner), dtype=bool)
    keep[picked] = False
    picked_owner, picked_position = owner[picked], position[picked]
    draw: Draw = []
    for u in np.unique(picked_owner).tolist():
        unit = units[u]
        assert unit is not None, "a drawn sample's unit is still held"
        draw.append((unit, picked_position[picked_owner == u]))
        left[u] -= len(draw[-1][1])
        if left[u] == 0:
            units[u] = None
    return owner[keep], position[keep], draw


def decoded(draws: Iterable[Draw], decoder: Decoder, with_keys: bool) -> Iterator[tuple]:
    """(uint8 images, int64 labels, keys or None) per draw; a bad image names its shard and key."""
    for draw in draws:
        try:
            images = decoder([unit.part(positions) for unit, positions in draw])
        except DecodeError as exc:
            unit, position = _locate(draw, exc.position)
            raise ShardError(
                f"{unit.url}: sample {unit.key(position)}: cannot decode ({exc.cause})"
            ) from None
        labels = torch.from_numpy(np.concatenate([unit.labels[positions] for unit, positions in draw]))
        keys = [unit.key(p) for unit, positions in draw for p in positions.tolist()] if with_keys else None
        yield images, labels, keys


def transformed(
    batches: Iterable[tuple], train: bool, layout: str, generator: torch.Generator
) -> Iterator[tuple]:
    """Batches augmented (training) or only normalised, as float32 NCHW."""
    for images, labels, keys in batches:
        out = augment(images, generator, layout) if train else normalize(images, layout)
        yield out, labels, keys


def _locate(draw: Draw, position: int) -> tuple[LoadedUnit, int]:
    for unit, positions in draw:
        if position < len(positions):
            return unit, int(positions[position])
        position -= len(positions)
    raise IndexError(position)
