"""One small timer for the training loop: where each batch's time went.

Per batch there are two measured spans on one clock: `loading`, the time blocked in `next(iterator)`
(including the host-to-device copy when the loader makes it, as every feedrate loader does), and the
step (forward, backward, optimiser, or an emulated accelerator's sleep). On CUDA the clock synchronises
the device before every reading, so a kernel still running when a span ends is charged to that span and
never hides in the next batch's figure (timm's benchmark picks its clock the same way, once).

Per epoch, the figures run.json reports:
- data-wait fraction = time blocked on the loader / epoch wall time;
- AU (accelerator utilisation, MLPerf Storage's definition) = compute time / wall time with the first
  batch excluded, so worker start-up and the first fetch do not count against a steady-state figure.
  Wall time includes the loop's own bookkeeping (CSV rows, progress bar), which is not compute.

A job of several processes (torchrun) is judged as a whole (`across_ranks`, `combine_ranks`): img/s
is every rank's samples over the slowest rank's wall time (what the job delivers), while the data-wait
fraction and AU are the means of the ranks' own fractions, as MLPerf Storage reports the mean AU of its
accelerators. Under DDP a rank that waits for a slower peer does so inside the step's gradient
all-reduce, so its compute time includes that wait; each rank's own figures sit beside the job's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

from training.stages import summed

T = TypeVar("T")


class Clock:
    """A monotonic clock that synchronises the device first (when given a `sync`), plus wall time."""

    def __init__(
        self,
        sync: Callable[[], object] | None = None,
        perf: Callable[[], float] = time.perf_counter,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._sync = sync
        self._perf = perf
        self._wall = wall

    def now(self) -> float:
        if self._sync is not None:
            self._sync()
        return self._perf()

    def wall(self) -> float:
        """Unix time, for the CSV's `start` column (never used for durations)."""
        return self._wall()


class BatchTime(NamedTuple):
    """One batch: its own spans and the epoch's cumulative figures after it (a CSV type-2 row).

    A named tuple: one is made per batch between the step and the next fetch, where every microsecond
    counts against AU, and it costs a quarter of a frozen dataclass.
    """

    index: int  # 1-based
    samples: int
    loading: float
    step: float
    cum_loading: float
    cum_duration: float


@dataclass(frozen=True)
class EpochStats:
    """What one epoch (training or validation) measured."""

    start: float  # Unix time
    batches: int
    samples: int
    loading: float  # blocked on the loader, summed
    duration: float  # wall time from the epoch's start to the end of its last batch
    compute: float  # step time, summed
    first_batch: float  # wall time of the first batch (fetch + step), excluded from AU
    first_step: float = 0.0  # step time of the first batch (part of `compute`, excluded from AU)
    # seconds per stage of the loader's data path in this epoch, {"wall": {...}, "cpu": {...}}
    # (loaders.stagetimes; training.stages reads them); None when the loader reports none
    stages: dict[str, dict[str, float]] | None = None

    @property
    def img_per_s(self) -> float | None:
        return self.samples / self.duration if self.duration > 0 else None

    @property
    def data_wait_fraction(self) -> float | None:
        return self.loading / self.duration if self.duration > 0 else None

    @property
    def au(self) -> float | None:
        """Compute / wall time without the first batch; None with fewer than two batches."""
        wall = self.duration - self.first_batch
        if self.batches < 2 or wall <= 0:
            return None
        return min(1.0, (self.compute - self.first_step) / wall)

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "batches": self.batches,
            "samples": self.samples,
            "seconds": self.duration,
            "loading_seconds": self.loading,
            "compute_seconds": self.compute,
            "first_batch_seconds": self.first_batch,
            "img_per_s": self.img_per_s,
            "data_wait_fraction": self.data_wait_fraction,
            "au": self.au,
        }


class EpochTimer:
    """Times one epoch's batches: `fetch` around the loader, `end_step` after the step."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.start = clock.wall()
        self._t0 = clock.now()
        self._fetched_at = self._t0
        self._pending_loading = 0.0
        self.batches: list[BatchTime] = []
        self.loading = 0.0
        self.compute = 0.0

    def fetch(self, get: Callable[[], T]) -> T:
        """`get()` (typically `next` on the loader's iterator), timed as loading; exceptions propagate."""
        before = self.clock.now()
        item = get()
        self._fetched_at = self.clock.now()
        self._pending_loading = self._fetched_at - before
        return item

    def end_step(self, samples: int) -> BatchTime:
        """Close the batch fetched last: its step ran from the fetch until now."""
        now = self.clock.now()
        step = now - self._fetched_at
        self.loading += self._pending_loading
        self.compute += step
        batches = self.batches
        batch = BatchTime(
            len(batches) + 1, samples, self._pending_loading, step, self.loading, now - self._t0
        )
        batches.append(batch)
        return batch

    def stats(self, stages: dict[str, dict[str, float]] | None = None) -> EpochStats:
        """The epoch so far; its duration ends with the last completed batch. `stages`: the loader's
        stage seconds over the epoch (training.stages.between), carried for run.json."""
        first = self.batches[0] if self.batches else None
        last = self.batches[-1] if self.batches else None
        return EpochStats(
            start=self.start,
            batches=len(self.batches),
            samples=sum(b.samples for b in self.batches),
            loading=self.loading,
            duration=last.cum_duration if last else 0.0,
            compute=self.compute,
            first_batch=first.cum_duration if first else 0.0,
            first_step=first.step if first else 0.0,
            stages=stages,
        )


def join_parts(before: EpochStats | None, after: EpochStats | None) -> EpochStats:
    """One rank's epoch from the part before a checkpoint and the part after the resume (either may be
    missing when the world size changed). Counts and times add up; both parts' first batches are left out
    of AU (each is a start: of the epoch, of the resumed process), so `first_batch` and `first_step` add
    up too. `start` is the epoch's first part's."""
    if before is None or after is None:
        part = before if after is None else after
        assert part is not None
        return part
    return EpochStats(
        start=before.start,
        batches=before.batches + after.batches,
        samples=before.samples + after.samples,
        loading=before.loading + after.loading,
        duration=before.duration + after.duration,
        compute=before.compute + after.compute,
        first_batch=before.first_batch + after.first_batch,
        first_step=before.first_step + after.first_step,
        stages=summed([before.stages, after.stages]),
    )


def combine(epochs: list[EpochStats]) -> dict[str, float | None]:
    """Figures over several epochs, each epoch's first batch excluded from AU as in `EpochStats.au`."""
    duration = sum(e.duration for e in epochs)
    samples = sum(e.samples for e in epochs)
    loading = sum(e.loading for e in epochs)
    counted = [e for e in epochs if e.batches >= 2]
    wall = sum(e.duration - e.first_batch for e in counted)
    compute = sum(e.compute - e.first_step for e in counted)
    return {
        "img_per_s": samples / duration if duration > 0 else None,
        "data_wait_fraction": loading / duration if duration > 0 else None,
        "au": min(1.0, compute / wall) if wall > 0 else None,
    }


def _mean(values: Sequence[float | int | None]) -> float | None:
    """The mean of the figures the ranks have (a rank with a single batch has no AU), or None."""
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def across_ranks(ranks: Sequence[EpochStats]) -> dict[str, float | int | None]:
    """One epoch of a job, from each rank's stats (indexed by rank), in `EpochStats.as_dict()`'s keys.

    Samples are summed and the wall time is the slowest rank's, so img/s is what the job delivered;
    times spent loading, computing and on the first batch are means over the ranks, and so are the
    data-wait fraction and AU. One rank: exactly its own `as_dict()`.
    """
    if len(ranks) == 1:
        return ranks[0].as_dict()
    samples = sum(r.samples for r in ranks)
    duration = max(r.duration for r in ranks)
    return {
        "batches": max(r.batches for r in ranks),
        "samples": samples,
        "seconds": duration,
        "loading_seconds": _mean([r.loading for r in ranks]),
        "compute_seconds": _mean([r.compute for r in ranks]),
        "first_batch_seconds": _mean([r.first_batch for r in ranks]),
        "img_per_s": samples / duration if duration > 0 else None,
        "data_wait_fraction": _mean([r.data_wait_fraction for r in ranks]),
        "au": _mean([r.au for r in ranks]),
    }


def combine_ranks(epochs: Sequence[Sequence[EpochStats]]) -> dict[str, float | None]:
    """`combine` for a job: `epochs[i][r]` is epoch i of rank r (epochs may have different rank counts
    when a resumed run changed its world size). One rank: exactly `combine`'s figures.

    img/s: all samples over the sum of each epoch's slowest wall time; data-wait fraction and AU: the
    mean over the ranks of each rank's `combine` figure.
    """
    if not epochs:
        return combine([])
    ranks = max(len(e) for e in epochs)  # a resumed run may have changed its world size
    if ranks == 1:
        return combine([e[0] for e in epochs])
    per_rank = [combine([e[r] for e in epochs if r < len(e)]) for r in range(ranks)]
    duration = sum(max(r.duration for r in e) for e in epochs)
    samples = sum(r.samples for e in epochs for r in e)
    return {
        "img_per_s": samples / duration if duration > 0 else None,
        "data_wait_fraction": _mean([c["data_wait_fraction"] for c in per_rank]),
        "au": _mean([c["au"] for c in per_rank]),
    }
