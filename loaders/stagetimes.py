"""Where a loader's time goes: seconds of wall and CPU time per stage of its data path (the stage contract).

A loader may offer one optional method, read by the training loop once before and once after each epoch:

    def stage_times(self) -> dict[str, dict[str, float]] | None:
        return self._stages.snapshot()      # {"wall": {"decode": 1.2, ...}, "cpu": {"decode": 1.1, ...}}

The figures are cumulative since the loader was built and summed over all its readers (threads, worker
processes), so the harness takes per-epoch differences and two readers decoding side by side for one
second count two seconds. A stage the loader cannot separate is left out: an absent key means "not
separable", never zero. A loader without the method, or returning None, reports no stages.

The stages (STAGES), each a part of the path from the bytes at rest to a batch in the training loop:

- `storage`: getting bytes from disk or an object store, retries and backoff included;
- `decode`: bytes to uint8 pixels (a raw copy, PNG/JPEG decoding);
- `augment`: crop, flip, normalise, batching;
- `transfer`: host-to-device copies, and any copy between a reader and the consumer (pinning,
  shared-memory staging);
- `queue`: the hand-off of a batch that is ready: getting it through a queue or pipe to the consumer
  (waits on locks, pickling and unpickling), not waiting for a reader that is still producing it.

Where a stage runs matters to the what-if figures (training.stages): reader stages run side by side and
ahead of the step, consumer stages in the step's own path. By default `transfer` and `queue` are the
consumer's and the rest the readers'. A loader whose consumer does more (DALI's CPU path waits on the
pipeline and augments in the consumer's thread) says so with a third, optional entry, `consumer`: the
wall seconds of each stage spent on the consumer's path (`add(..., consumer=True)`,
`timed(stage, consumer=True)`). When it is present it replaces the default for that loader.

`StageTimes` is the counter a backend keeps: `timed(stage)` around a stage's code in a reader thread,
`add(stage, wall, cpu)` for a span measured elsewhere, `merge(snapshot)` for the counters a worker
process sent back; `snapshot()` is what `stage_times()` returns. CPU time is the measuring thread's own
(`time.thread_time`): a stage that fans its work out to a pool of its own adds the pool's CPU seconds
with `add`. The module imports nothing of the project beyond the errors, so every backend can use it.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from feedrate.errors import FeedrateError

STAGES = ("storage", "decode", "augment", "transfer", "queue")
KINDS = ("wall", "cpu")
CONSUMER = "consumer"  # optional: wall seconds per stage on the consumer's path (see the docstring)

# {"wall": {stage: seconds}, "cpu": {stage: seconds}}: cumulative, summed over the readers.
Snapshot = dict[str, dict[str, float]]


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise FeedrateError(f"unknown stage {stage!r}; accepted: {', '.join(STAGES)}")


class StageTimes:
    """Cumulative wall and CPU seconds per stage, safe to add to from several reader threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wall: dict[str, float] = {}
        self._cpu: dict[str, float] = {}
        self._consumer: dict[str, float] = {}

    def add(self, stage: str, wall: float, cpu: float, consumer: bool = False) -> None:
        """Count `wall` and `cpu` seconds (non-negative) for `stage`; `consumer`: spent on the consumer's
        path (the step waits for it), not in a reader running ahead."""
        _check_stage(stage)
        if not (wall >= 0 and cpu >= 0 and math.isfinite(wall) and math.isfinite(cpu)):
            raise FeedrateError(f"stage {stage}: wall {wall} and cpu {cpu} must be finite seconds >= 0")
        with self._lock:
            self._wall[stage] = self._wall.get(stage, 0.0) + wall
            self._cpu[stage] = self._cpu.get(stage, 0.0) + cpu
            if consumer:
                self._consumer[stage] = self._consumer.get(stage, 0.0) + wall

    @contextlib.contextmanager
    def timed(self, stage: str, consumer: bool = False) -> Iterator[None]:
        """Count the block's wall time and this thread's CPU time for `stage` (also when it raises)."""
        _check_stage(stage)
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - wall, time.thread_time() - cpu, consumer)

    def merge(self, snapshot: Mapping[str, Mapping[str, float]]) -> None:
        """Add another counter's `snapshot()` (a worker process's, sent with its batches): its figures
        must be that counter's increments since it last sent, or a fresh counter's totals."""
        checked = validate(snapshot, "merged snapshot")
        for stage in STAGES:
            if stage in checked["wall"]:
                self.add(stage, checked["wall"][stage], checked["cpu"].get(stage, 0.0))
        with self._lock:
            for stage, seconds in checked.get(CONSUMER, {}).items():
                self._consumer[stage] = self._consumer.get(stage, 0.0) + seconds

    def snapshot(self) -> Snapshot:
        """The totals so far, as `stage_times()` returns them (copies: later adds do not change them)."""
        with self._lock:
            out = {"wall": dict(self._wall), "cpu": dict(self._cpu)}
            if self._consumer:
                out[CONSUMER] = dict(self._consumer)
            return out


def validate(snapshot: Any, who: str) -> Snapshot:
    """`snapshot` checked against the contract (a dict of `wall` and `cpu`, each stage in STAGES, finite
    seconds >= 0); a float copy of it, or a FeedrateError naming `who` and the bad value."""
    if not isinstance(snapshot, Mapping) or set(snapshot) - {*KINDS, CONSUMER} or "wall" not in snapshot:
        keys = sorted(snapshot) if isinstance(snapshot, Mapping) else type(snapshot).__name__
        raise FeedrateError(
            f"{who}: stage times {keys} must be a dict with keys {', '.join(KINDS)} (and {CONSUMER})"
        )
    out: Snapshot = {}
    for kind in (*KINDS, CONSUMER):
        if kind == CONSUMER and CONSUMER not in snapshot:
            continue
        seconds = snapshot.get(kind) or {}
        if not isinstance(seconds, Mapping):
            raise FeedrateError(f"{who}: stage times {kind!r} is a {type(seconds).__name__}, not a dict")
        for stage, value in seconds.items():
            if stage not in STAGES:
                raise FeedrateError(f"{who}: unknown stage {stage!r}; accepted: {', '.join(STAGES)}")
            if not isinstance(value, int | float) or not (math.isfinite(value) and value >= 0):
                raise FeedrateError(f"{who}: {kind} seconds of {stage} = {value!r}; expected a number >= 0")
        out[kind] = {stage: float(seconds[stage]) for stage in STAGES if stage in seconds}
    return out


def stage_times(loader: object) -> Snapshot | None:
    """The loader's cumulative stage times (checked), or None when it reports none (no `stage_times`
    method, or the method returned None)."""
    method = getattr(loader, "stage_times", None)  # optional: loaders.Loader does not require it
    if method is None:
        return None
    snapshot = method()
    return None if snapshot is None else validate(snapshot, f"{type(loader).__name__}.stage_times()")
