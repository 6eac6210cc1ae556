"""The generator stages a shard reader chains, each short, with one error policy: raise, naming the
shard and the sample -- or, when the reader skips bad data (the `skip_bad` option), leave the sample
out, count it and name it on stderr (`SkipLog`), never silently.

    units ─► load_unit ─► prefetched ─► drawn ─► decoded ─► transformed
             (one read)   (a thread    (shuffle  (uint8     (augment or
                          ahead)       buffer)   batches,   normalise)
                                                 sample ids)

Stage times (loaders.stagetimes), when the reader passes a `StageTimes`: `prefetched` counts the
reader's wait for a shard's bytes as `storage` (the fetch itself runs in a pool thread, which adds its
CPU seconds: see streaming.reader_messages); `drawn` counts the shuffle buffer's draws as `augment`
(batching); `decoded` counts building each uint8 batch and its labels as `decode`; `transformed` counts
crop, flip and normalise as `augment`. One timed span per batch or shard, never per sample.

Samples are never Python objects of their own: a loaded unit is one buffer plus index arrays, the
shuffle buffer is two integer arrays, and each stage works a batch at a time. Every batch carries its
samples' ids (loaders.resume's numbering: the shard's first sample number plus the row), one int64
array per batch, so the consumer can record what it handed out and the augmentation can look a
sample's draws up by id.

Resuming exactly (loaders.streaming): what the shuffle buffer draws depends only on the units' usable
positions and the rng, so `skip_draws` replays a reader's first batches on numbers alone -- no read,
no decode -- and `drawn` continues from there; the units the buffer still held are read again.

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
import copy
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
from loaders.augment import EpochDraws, normalize
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
    id0: int = 0  # the sample number (loaders.resume) of the sample at position 0: ids are id0 + position

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
    shard_id0: int = 0,
) -> LoadedUnit:
    """Read a unit's bytes (one read) and parse its labels; errors name the shard and the sample.

    With `skips`, bad samples are left out of the unit's `good` positions and counted instead, and
    `unusable` (why the whole shard cannot be used, found when its index was read) skips all of them.
    A unit of a subset of a range (`unit.rows`) reads the range and uses only the subset: the others
    are neither checked nor counted. `shard_id0`: the sample number of the shard's first sample.
    """
    url = fetcher.root.store.url_for(ref.name)
    nothing = np.zeros(0, dtype=np.int64)
    id0 = shard_id0 + unit.first

    def empty() -> LoadedUnit:
        return LoadedUnit(url, index, unit.first, unit.stop, memoryview(b""), 0, nothing, nothing, id0)

    if unusable:  # only a skipping reader gets here: otherwise the loader refused the shard when built
        if skips is None:
            raise ShardError(unusable)
        skips.skip(url, [], unusable, unit.samples)
        return empty()
    base, end = (0, ref.bytes) if unit.whole else index.span(unit.first, unit.stop)
    truncated = ""
    try:
        data = fetcher.read(ref, base, end)
    except TruncatedShard as exc:
        data, truncated = memoryview(exc.data)[: exc.got], str(exc)
        if skips is not None and (fetcher.verify or fetcher.cache is not None):
            # verified reading was asked for, and a part of a shard cannot be checked: none of it is used
            skips.skip(url, [], f"{truncated.removeprefix(f'{url}: ')}; unverifiable", unit.samples)
            return empty()
    except ShardError as exc:  # corrupt, longer than the manifest says, or a bad cached copy
        if skips is None:
            raise
        skips.skip(url, [], str(exc).removeprefix(f"{url}: ").removeprefix(url).strip(), unit.samples)
        return empty()
    rows = slice(unit.first, unit.stop)
    keys = index.keys[rows]
    # samples of the range that are not the unit's count as already bad: never checked, never counted
    bad = np.zeros(unit.stop - unit.first, dtype=bool)
    if unit.rows is not None:
        bad[:] = True
        bad[unit.positions()] = False

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
            lost = [keys[i] for i in np.flatnonzero(past & ~bad)]
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
    return LoadedUnit(url, index, unit.first, unit.stop, data, base, labels, good, id0)


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
    lead: int = 0,
) -> Iterator:
    """`load(item)` for each item, in order, with up to `depth` loads running ahead in `pool`.

    `depth` may be a function, asked again before each item: a depth re-planned as the link is measured.
    `ready`: loads of the first items, submitted earlier (read ahead across an epoch boundary).
    `spill`: (the items that come next, a list to append their loads to): once every item is submitted,
    each load taken out is replaced by one of the next items', so as many loads stay in flight across
    the boundary as within it (the caller hands `spill`'s loads to the next pass as its `ready`); an
    item still loading for this pass is not started again until that load is done. `lead`: let that
    many loads be in flight across the boundary when it is more than `depth` (what the next pass needs
    before it can draw its first batch).
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
            while len(started) < len(following) and len(pending) + len(started) <= max(want(), lead):
                nxt = following[len(started)]
                if any(item == nxt and not future.done() for item, future in pending):
                    break  # the same item is still loading for this pass: one fetch of it at a time
                started.append(pool.submit(load, nxt))
        yield result(pending.popleft()[1])


Draw = list[tuple[LoadedUnit, np.ndarray]]  # one batch: (unit, positions in it) groups


class ShuffleBuffer:
    """The shuffle buffer's bookkeeping, on sample positions only (no bytes): two arrays, the unit
    number and the position in it of every sample held, rather than a Python object per sample.

    What it draws depends only on the usable positions of the units added and on `rng`, never on the
    bytes: so `skip_draws` can replay a reader's first draws on numbers alone (an exact resume) and
    hand the buffer on, in the very state the uninterrupted reader's would be in.
    """

    def __init__(self, batch: int, buffer: int, rng: np.random.Generator | None) -> None:
        self.batch, self.buffer, self.rng = batch, buffer, rng
        self.left: list[int] = []  # per unit added: its samples not drawn yet
        self.owner = np.zeros(0, dtype=np.int64)
        self.position = np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.owner)

    def add(self, usable: np.ndarray) -> int:
        """Put a unit's usable positions in; its unit number."""
        number = len(self.left)
        self.left.append(len(usable))
        self.owner = np.concatenate([self.owner, np.full(len(usable), number)])
        self.position = np.concatenate([self.position, usable])
        return number

    def ready(self) -> bool:
        """Whether a batch may be drawn while units are still to come (the buffer is full)."""
        return len(self.owner) >= self.buffer + self.batch

    def take(self) -> list[tuple[int, np.ndarray]]:
        """Draw one batch (at random, or in order without an rng): (unit number, positions) groups,
        by unit number; a unit drawn to its end has `left` 0."""
        k = min(self.batch, len(self.owner))
        picked = np.arange(k) if self.rng is None else self.rng.choice(len(self.owner), size=k, replace=False)
        keep = np.ones(len(self.owner), dtype=bool)
        keep[picked] = False
        picked_owner, picked_position = self.owner[picked], self.position[picked]
        groups = []
        for u in np.unique(picked_owner).tolist():
            positions = picked_position[picked_owner == u]
            self.left[u] -= len(positions)
            groups.append((u, positions))
        self.owner, self.position = self.owner[keep], self.position[keep]
        return groups

    def copy(self) -> ShuffleBuffer:
        """The buffer as it is now, apart from this one (its rng copied too; the arrays are never
        changed in place, so they are shared)."""
        out = ShuffleBuffer(self.batch, self.buffer, copy.deepcopy(self.rng))
        out.left, out.owner, out.position = list(self.left), self.owner, self.position
        return out


@dataclass
class ResumePoint:
    """A reader's stream after its first `draws` batches, replayed on numbers (`skip_draws`): the
    buffer as it then is, the units it still holds samples of (`held`: (unit number, index in the
    reader's unit list) -- to be read again), the index of the next unit to add, and per batch drawn
    its sample ids (for checking a state against its consumed set)."""

    draws: int
    buffer: ShuffleBuffer
    held: list[tuple[int, int]]
    next_unit: int
    ids: list[np.ndarray]
    earlier: ResumePoint | None = None  # skip_draws' `before`: the point after fewer draws

    def copy(self) -> ResumePoint:
        """A point to resume from again: `drawn` changes the buffer of the one it is given."""
        return ResumePoint(self.draws, self.buffer.copy(), list(self.held), self.next_unit, list(self.ids))


def skip_draws(
    usable: Sequence[np.ndarray],
    id0: Sequence[int],
    batch: int,
    buffer: int,
    rng: np.random.Generator | None,
    draws: int,
    before: int | None = None,
) -> ResumePoint:
    """Replay the first `draws` batches `drawn` would draw from units with these usable positions
    (and first sample numbers `id0`), on numbers alone; ValueError when the units hold fewer.
    `before` (0..draws-1): the point after that many draws is kept as well, as the result's `earlier`
    (one pass for both: a resumed reader whose last batch is read again)."""
    shuffle = ShuffleBuffer(batch, buffer, rng)
    reader_index: list[int] = []  # unit number -> index in the reader's list
    ids: list[np.ndarray] = []
    added = 0
    earlier: list[ResumePoint] = []
    if before is not None and not 0 <= before < draws:
        raise ValueError(f"before {before} is not in 0..{draws - 1}")

    def point(buf: ShuffleBuffer) -> ResumePoint:
        held = [(u, reader_index[u]) for u, left in enumerate(buf.left) if left]
        return ResumePoint(len(ids), buf, held, added, list(ids))

    def take() -> None:
        groups = shuffle.take()
        ids.append(np.concatenate([id0[reader_index[u]] + p for u, p in groups]))
        if len(ids) == before:
            earlier.append(point(shuffle.copy()))

    if before == 0:
        earlier.append(point(shuffle.copy()))
    if draws:
        for i, positions in enumerate(usable):
            added = i + 1
            if not len(positions):
                continue
            reader_index.append(i)
            shuffle.add(positions)
            while shuffle.ready() and len(ids) < draws:
                take()
            if len(ids) == draws:
                break
        while len(ids) < draws and len(shuffle):
            take()
        if len(ids) < draws:
            raise ValueError(f"the units hold {len(ids)} batches, fewer than {draws}")
    out = point(shuffle)
    out.earlier = earlier[0] if earlier else None
    return out


def drawn(
    loaded: Iterable[LoadedUnit],
    batch: int,
    buffer: int,
    rng: np.random.Generator | None,
    stages: StageTimes | None = None,
    resume: ResumePoint | None = None,
) -> Iterator[Draw]:
    """Batches drawn at random from a buffer of >= `buffer` samples (in order when `rng` is None).

    A unit's bytes are dropped as soon as its last sample has been drawn. `stages`: the buffer's work
    (adding a unit, each draw) is counted as `augment` (batching). `resume`: continue where a replay
    (`skip_draws`) stopped, its buffer and rng as they are; `loaded` then starts with the units it still
    holds (`resume.held`, in order), followed by the units not added yet.
    """
    span = stages.timed if stages is not None else _untimed
    shuffle = ShuffleBuffer(batch, buffer, rng) if resume is None else resume.buffer
    units: list[LoadedUnit | None] = [None] * len(shuffle.left)
    loaded = iter(loaded)
    if resume is not None:
        for number, _ in resume.held:
            units[number] = next(loaded)
        while shuffle.ready():  # the replay stopped mid-unit, with a batch still to draw before the next
            with span("augment"):
                draw = _draw(units, shuffle)
            yield draw
    for unit in loaded:
        usable = unit.usable
        if not len(usable):
            continue  # every sample of it was skipped
        with span("augment"):
            units.append(unit)
            shuffle.add(usable)
        while shuffle.ready():
            with span("augment"):
                draw = _draw(units, shuffle)
            yield draw
    while len(shuffle):
        with span("augment"):
            draw = _draw(units, shuffle)
        yield draw


_UNTIMED = contextlib.nullcontext()


def _untimed(stage: str) -> contextlib.AbstractContextManager:
    """No stage timing (a reader without a StageTimes)."""
    return _UNTIMED


def _draw(units: list[LoadedUnit | None], shuffle: ShuffleBuffer) -> Draw:
    draw: Draw = []
    for u, positions in shuffle.take():
        unit = units[u]
        assert unit is not None, "a drawn sample's unit is still held"
        draw.append((unit, positions))
        if shuffle.left[u] == 0:
            units[u] = None
    return draw


def decoded(
    draws: Iterable[Draw],
    decoder: Decoder,
    with_keys: bool,
    skips: SkipLog | None = None,
    stages: StageTimes | None = None,
) -> Iterator[tuple]:
    """(uint8 images, int64 labels, keys or None, int64 sample ids) per draw; a bad image names its
    shard and key, or (with `skips`) is left out of its batch and counted, and the rest of the batch is
    decoded again. `stages`: each batch's decoding, labels, keys and ids are counted as `decode`."""
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
    ids = torch.from_numpy(np.concatenate([unit.id0 + positions for unit, positions in draw]))
    keys = [unit.key(p) for unit, positions in draw for p in positions.tolist()] if with_keys else None
    return images, labels, keys, ids


def transformed(
    batches: Iterable[tuple],
    layout: str,
    draws: EpochDraws | None,
    stages: StageTimes | None = None,
) -> Iterator[tuple]:
    """Batches augmented by the epoch's per-sample `draws` (training: looked up by sample id, so a
    sample's crop and flip do not depend on who reads it) or, without draws, only normalised; float32
    NCHW (`stages`: counted as `augment`)."""
    span = stages.timed if stages is not None else _untimed
    for images, labels, keys, ids in batches:
        with span("augment"):
            out = draws.augment(images, ids, layout) if draws is not None else normalize(images, layout)
        yield out, labels, keys, ids


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
