"""The generator stages a shard reader chains, each short, with one error policy: raise, naming the
shard and the sample -- or, when the reader skips bad data (the `skip_bad` option), leave the sample
out, count it and name it on stderr (`SkipLog`), never silently.

    units ─► load_unit ─► prefetched ─► drawn ─► decoded ─► transformed
             (one read)   (a thread    (shuffle  (uint8     (augment or
                          ahead)       buffer)   batches)   normalise)

Stage times (loaders.stagetimes), when the reader passes a `StageTimes`: `prefetched` counts the
reader's wait for a shard's bytes as `storage` (the fetch itself runs in a pool thread, which adds its
CPU seconds: see streaming.reader_messages); `drawn` counts the shuffle buffer's draws as `augment`
(batching); `decoded` counts building each uint8 batch and its labels as `decode`; `transformed` counts
crop, flip and normalise as `augment`. One timed span per batch or shard, never per sample.

Samples are never Python objects of their own: a loaded unit is one buffer plus index arrays, the
shuffle buffer is two integer arrays, and each stage works a batch at a time.

What counts as bad data, and what skipping it means:
- a shard that cannot be used at all (its index is corrupt or disagrees with the manifest, its bytes
  fail the sha256 check or are longer than the manifest says): all of the unit's samples;
- a truncated shard: the samples whose bytes did not all arrive (the others are used);
- a sample that lacks its image or its label, whose label is not an integer or not a class, or whose
  image does not decode: that sample.
Storage that cannot be reached is never "bad data": it fails after its retry budget (feedrate.storage).
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from feedrate.shardformat import ShardError, ShardIndex, TruncatedShard
from loaders.augment import augment, normalize
from loaders.decode import DecodeError, Decoder, label_problem, parse_labels
from loaders.partition import Unit
from loaders.shards import ShardFetcher, ShardRef
from loaders.stagetimes import StageTimes

WARN_LINES = 10  # skips named on stderr per process; later ones are counted only


class SkipLog:
    """Samples a reader left out: counted for stats()["skipped"], and named on stderr (the first
    `warn_lines` skips of a process, then a note that later ones are only counted), never silently.
    Thread-safe: units are loaded in a prefetch thread."""

    def __init__(self, prog: str = "wds", warn_lines: int = WARN_LINES) -> None:
        self.prog = prog
        self.warn_lines = warn_lines
        self.count = 0
        self._printed = 0
        self._lock = threading.Lock()

    def skip(self, url: str, keys: Sequence[str], reason: str, count: int | None = None) -> None:
        """Record `count` skipped samples (default: one per key) of shard `url`, and why."""
        n = len(keys) if count is None else count
        if n <= 0:
            return
        with self._lock:
            self.count += n
            self._printed += 1
            printed = self._printed
        if printed <= self.warn_lines:
            named = f" ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})" if keys else ""
            print(
                f"{self.prog}: skipped {n} sample(s) of {url}{named}: {reason}", file=sys.stderr, flush=True
            )
        if printed == self.warn_lines:
            print(
                f"{self.prog}: further skipped samples are counted in stats() only",
                file=sys.stderr,
                flush=True,
            )


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
    good: np.ndarray | None = None  # positions of the usable samples (None: all of them)

    @property
    def samples(self) -> int:
        return self.stop - self.first

    @property
    def usable(self) -> np.ndarray:
        """Positions (0-based in the unit) of the samples that may be drawn."""
        return np.arange(self.samples) if self.good is None else self.good

    def part(self, positions: np.ndarray) -> tuple[memoryview, np.ndarray, np.ndarray]:
        """(buffer, offsets, sizes) of the images at unit positions `positions`."""
        rows = positions + self.first
        return self.data, self.index.image_offset[rows] - self.base, self.index.image_size[rows]

    def key(self, position: int) -> str:
        return self.index.keys[self.first + position]


def load_unit(
    unit: Unit,
    ref: ShardRef,
    index: ShardIndex,
    fetcher: ShardFetcher,
    classes: int,
    skips: SkipLog | None = None,
    unusable: str = "",
) -> LoadedUnit:
    """Read a unit's bytes (one read) and parse its labels; errors name the shard and the sample.

    With `skips`, bad samples are left out of the unit's `good` positions and counted instead, and
    `unusable` (why the whole shard cannot be used, found when its index was read) skips all of them.
    """
    url = fetcher.root.store.url_for(ref.name)
    nothing = np.zeros(0, dtype=np.int64)
    if unusable:  # only a skipping reader gets here: otherwise the loader refused the shard when built
        if skips is None:
            raise ShardError(unusable)
        skips.skip(url, [], unusable, unit.samples)
        return LoadedUnit(url, index, unit.first, unit.stop, memoryview(b""), 0, nothing, nothing)
    base, end = (0, ref.bytes) if unit.whole else index.span(unit.first, unit.stop)
    truncated = ""
    try:
        data = fetcher.read(ref, base, end)
    except TruncatedShard as exc:
        data, truncated = memoryview(exc.data)[: exc.got], str(exc)
        if skips is not None and (fetcher.verify or fetcher.cache is not None):
            # verified reading was asked for, and a part of a shard cannot be checked: none of it is used
            skips.skip(url, [], f"{truncated.removeprefix(f'{url}: ')}; unverifiable", unit.samples)
            return LoadedUnit(url, index, unit.first, unit.stop, memoryview(b""), 0, nothing, nothing)
    except ShardError as exc:  # corrupt, longer than the manifest says, or a bad cached copy
        if skips is None:
            raise
        skips.skip(url, [], str(exc).removeprefix(f"{url}: ").removeprefix(url).strip(), unit.samples)
        return LoadedUnit(url, index, unit.first, unit.stop, memoryview(b""), 0, nothing, nothing)
    rows = slice(unit.first, unit.stop)
    keys = index.keys[rows]
    bad = np.zeros(unit.samples, dtype=bool)

    def reject(mask: np.ndarray, reason: str) -> None:
        """Samples `mask` are bad: an error naming the first (no skips), else skipped and counted."""
        mask = mask & ~bad
        if not mask.any():
            return
        first = int(np.flatnonzero(mask)[0])
        if skips is None:
            raise ShardError(f"{url}: sample {keys[first]}: {reason}")
        skips.skip(url, [keys[i] for i in np.flatnonzero(mask)], reason)
        bad[mask] = True

    ends = np.maximum(
        index.image_offset[rows] + index.image_size[rows], index.label_offset[rows] + index.label_size[rows]
    )
    past = ends - base > len(data)
    if truncated:
        if skips is None:  # name the first sample it cost, when it cost any
            lost = [keys[i] for i in np.flatnonzero(past)]
            more = f" and {len(lost) - 1} more" if len(lost) > 1 else ""
            raise ShardError(truncated + (f"; sample {lost[0]}{more} did not arrive whole" if lost else ""))
        reject(past, "its bytes did not all arrive (truncated shard)")
    reject(past, "its index points past the end of the shard (index and shard disagree)")
    missing = index.missing_rows(unit.first, unit.stop)
    reject(missing, f"it lacks a .{index.image_ext} or .cls member")
    labels = _parse_labels(
        data, index.label_offset[rows] - base, index.label_size[rows], classes, bad, reject
    )
    good = None if not bad.any() else np.flatnonzero(~bad)
    return LoadedUnit(url, index, unit.first, unit.stop, data, base, labels, good)


def _parse_labels(
    data: memoryview,
    offsets: np.ndarray,
    sizes: np.ndarray,
    classes: int,
    bad: np.ndarray,
    reject: Callable[[np.ndarray, str], None],
) -> np.ndarray:
    """Labels of the samples not yet `bad`; each one that is not a class index (decode.parse_labels)
    goes to `reject` (which raises, or marks it bad), and the rest are parsed again: one pass unless a
    label is bad."""
    labels = np.zeros(len(offsets), dtype=np.int64)
    todo = np.flatnonzero(~bad)
    while todo.size and len(data):
        parsed, first = parse_labels(data, offsets[todo], sizes[todo], classes)
        if first < 0:
            labels[todo] = parsed
            break
        labels[todo[:first]] = parsed[:first]
        row = todo[first]
        mask = np.zeros(len(offsets), dtype=bool)
        mask[row] = True
        reject(mask, label_problem(data, int(offsets[row]), int(sizes[row]), classes))
        todo = todo[first + 1 :]
    return labels


def prefetched(
    items: Iterable[Any],
    load: Callable[[Any], Any],
    pool: ThreadPoolExecutor,
    depth: int | Callable[[], int],
    ready: Sequence[Future] = (),
    spill: tuple[Sequence[Any], list[Future]] | None = None,
    stages: StageTimes | None = None,
) -> Iterator:
    """`load(item)` for each item, in order, with up to `depth` loads running ahead in `pool`.

    `depth` may be a function, asked again before each item: a depth re-planned as the link is measured.
    `ready`: loads of the first items, submitted earlier (read ahead across an epoch boundary).
    `spill`: (the items that come next, a list to append their loads to): once every item is submitted,
    each load taken out is replaced by one of the next items', so as many loads stay in flight across
    the boundary as within it (the caller hands `spill`'s loads to the next pass as its `ready`); an
    item still loading for this pass is not started again until that load is done.
    `stages`: the wait for each load's result is counted as `storage` (what the loads cost the reader).
    """

    def result(future: Future) -> Any:
        if stages is None:
            return future.result()
        with stages.timed("storage"):
            return future.result()

    want = depth if callable(depth) else lambda: depth
    items = list(items)
    pending: deque[tuple[Any, Future]] = deque(zip(items, ready, strict=False))
    for item in items[len(ready) :]:
        pending.append((item, pool.submit(load, item)))
        while len(pending) > want():
            yield result(pending.popleft()[1])
    while pending:
        if spill is not None:
            following, started = spill
            while len(started) < len(following) and len(pending) + len(started) <= want():
                nxt = following[len(started)]
                if any(item == nxt and not future.done() for item, future in pending):
                    break  # the same item is still loading for this pass: one fetch of it at a time
                started.append(pool.submit(load, nxt))
        yield result(pending.popleft()[1])


Draw = list[tuple[LoadedUnit, np.ndarray]]  # one batch: (unit, positions in it) groups


def drawn(
    loaded: Iterable[LoadedUnit],
    batch: int,
    buffer: int,
    rng: np.random.Generator | None,
    stages: StageTimes | None = None,
) -> Iterator[Draw]:
    """Batches drawn at random from a buffer of >= `buffer` samples (in order when `rng` is None).

    The buffer is two arrays (unit number, position) rather than a Python object per sample; a unit's
    bytes are dropped as soon as its last sample has been drawn. `stages`: the buffer's work (adding a
    unit, each draw) is counted as `augment` (batching).
    """
    span = stages.timed if stages is not None else _untimed
    units: list[LoadedUnit | None] = []
    left: list[int] = []
    owner = np.zeros(0, dtype=np.int64)
    position = np.zeros(0, dtype=np.int64)
    for unit in loaded:
        usable = unit.usable
        if not len(usable):
            continue  # every sample of it was skipped
        with span("augment"):
            units.append(unit)
            left.append(len(usable))
            owner = np.concatenate([owner, np.full(len(usable), len(units) - 1)])
            position = np.concatenate([position, usable])
        while len(owner) >= buffer + batch:
            with span("augment"):
                owner, position, draw = _take(units, left, owner, position, batch, rng)
            yield draw
    while len(owner):
        with span("augment"):
            owner, position, draw = _take(units, left, owner, position, batch, rng)
        yield draw


_UNTIMED = contextlib.nullcontext()


def _untimed(stage: str) -> contextlib.AbstractContextManager:
    """No stage timing (a reader without a StageTimes)."""
    return _UNTIMED


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


def decoded(
    draws: Iterable[Draw],
    decoder: Decoder,
    with_keys: bool,
    skips: SkipLog | None = None,
    stages: StageTimes | None = None,
) -> Iterator[tuple]:
    """(uint8 images, int64 labels, keys or None) per draw; a bad image names its shard and key, or
    (with `skips`) is left out of its batch and counted, and the rest of the batch is decoded again.
    `stages`: each batch's decoding, labels and keys are counted as `decode`."""
    span = stages.timed if stages is not None else _untimed
    for draw in draws:
        with span("decode"):
            batch = _decode_draw(draw, decoder, with_keys, skips)
        if batch is not None:
            yield batch


def _decode_draw(draw: Draw, decoder: Decoder, with_keys: bool, skips: SkipLog | None) -> tuple | None:
    """One draw's batch (see `decoded`), or None when every sample of it was skipped."""
    images = None
    while draw:
        try:
            images = decoder([unit.part(positions) for unit, positions in draw])
            break
        except DecodeError as exc:
            unit, position = _locate(draw, exc.position)
            if skips is None:
                raise ShardError(
                    f"{unit.url}: sample {unit.key(position)}: cannot decode ({exc.cause})"
                ) from None
            skips.skip(unit.url, [unit.key(position)], f"cannot decode ({exc.cause})")
            draw = _without(draw, exc.position)
    if images is None:
        return None  # every sample of the draw was skipped
    labels = torch.from_numpy(np.concatenate([unit.labels[positions] for unit, positions in draw]))
    keys = [unit.key(p) for unit, positions in draw for p in positions.tolist()] if with_keys else None
    return images, labels, keys


def transformed(
    batches: Iterable[tuple],
    train: bool,
    layout: str,
    generator: torch.Generator,
    stages: StageTimes | None = None,
) -> Iterator[tuple]:
    """Batches augmented (training) or only normalised, as float32 NCHW (`stages`: counted as `augment`)."""
    span = stages.timed if stages is not None else _untimed
    for images, labels, keys in batches:
        with span("augment"):
            out = augment(images, generator, layout) if train else normalize(images, layout)
        yield out, labels, keys


def _without(draw: Draw, position: int) -> Draw:
    """The draw without its sample at `position` (counted across its parts, in order)."""
    out: Draw = []
    for unit, positions in draw:
        kept = np.delete(positions, position) if 0 <= position < len(positions) else positions
        position -= len(positions)
        if len(kept):
            out.append((unit, kept))
    return out


def _locate(draw: Draw, position: int) -> tuple[LoadedUnit, int]:
    for unit, positions in draw:
        if position < len(positions):
            return unit, int(positions[position])
        position -= len(positions)
    raise IndexError(position)
