"""Per-epoch stage times, the verdict (`bound_by`) and the what-if figures run.json reports.

The loaders report cumulative seconds per stage (loaders.stagetimes, the contract); an epoch's stages are
the difference of two readings, taken when its loop starts and when its last batch is in (`between`).

The verdict (`verdict`), per epoch of `train` or `val`:
- `compute` when the time blocked on the loader is below 5% (COMPUTE_BOUND) of the step time, both
  with the first batch left out (worker start-up and the first fetch are not the steady state AU judges);
- otherwise the stage with the largest share of the reader time (the wall seconds of all reported
  stages, summed over readers), its share beside it; a tie goes to the stage earlier in the path;
- otherwise (data-bound, but the loader reports no stages) no verdict: the wait cannot be placed.

The what-if figures (`what_if`) rest on one model of the data path, written into run.json beside them
(MODEL): the readers run the reader stages (storage, decode, augment) side by side and ahead of the step
(prefetching), while the consumer's per-batch work (transfer, queue; a loader whose consumer does more
marks those seconds, loaders.stagetimes `consumer`) is in the step's path. So the
readers feed at most samples / max(reader-stage seconds / readers, consumer-stage seconds), and at an
accelerator rate A the wall time per image is max(1/A + c, p), with p and c the reader and consumer
seconds per image: AU >= 90% holds while 1/A >= 9c and 1/A >= 0.9p. Stages a loader does not report
count as zero, so a figure with stages missing is an upper bound (`not_separable` lists them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from feedrate.errors import FeedrateError
from loaders.stagetimes import CONSUMER, STAGES, Snapshot

COMPUTE_BOUND = 0.05  # data wait below this share of the step time: the accelerator is the bottleneck
AU_TARGET = 0.90  # MLPerf Storage's pass line, as report.summary.AU_PASS
CONSUMER_STAGES = ("transfer", "queue")
VERDICTS = (*STAGES, "compute")
MODEL = (
    "readers run their stages side by side and ahead of the step; the consumer's stages (transfer and "
    "queue, unless the loader marks others: consumer_stages) are in the step's path, once per batch. "
    "feed = samples / max(reader-stage s / readers, consumer-stage s); at accelerator rate A an image "
    "takes max(1/A + consumer s, reader s / readers)"
)
ASSUMPTIONS = {
    "cached": "the storage stage removed (the data served from a local cache at no cost); "
    "every other stage as measured",
    "twice_readers": "twice the readers, each on a core of its own, scaling perfectly: the reader stages' "
    "time halves; the consumer's stages (consumer_stages) do not",
    "au90_accelerator": "the accelerator rate (img/s per accelerator) above which this data path, as "
    "measured, keeps it busy less than 90% of the time",
}


def between(before: Snapshot | None, after: Snapshot | None) -> Snapshot | None:
    """The stage seconds spent between two cumulative readings (None when either has none).

    A stage present only in `after` started counting in between (its earlier figure is zero). A counter
    that went backwards is a loader bug (they are cumulative since it was built): a FeedrateError.
    """
    if before is None or after is None:
        return None
    out: Snapshot = {}
    for kind in ("wall", "cpu", CONSUMER) if CONSUMER in after else ("wall", "cpu"):
        now, then = after.get(kind, {}), before.get(kind, {})
        out[kind] = {}
        for stage, seconds in now.items():
            delta = seconds - then.get(stage, 0.0)
            if delta < -1e-9:
                raise FeedrateError(
                    f"loader stage times went backwards: {kind} {stage} {then[stage]:.6f} -> "
                    f"{seconds:.6f} s; they must be cumulative since the loader was built"
                )
            out[kind][stage] = max(0.0, delta)
    return out


def summed(snapshots: Sequence[Snapshot | None]) -> Snapshot | None:
    """Several ranks' epoch stages added up (a stage any rank reports counts); None when none reports."""
    known = [s for s in snapshots if s is not None]
    if not known:
        return None
    out: Snapshot = {"wall": {}, "cpu": {}}
    if any(CONSUMER in snap for snap in known):
        out[CONSUMER] = {}
    for snap in known:
        for kind in out:
            # a rank that marks no consumer stages has the default ones (transfer, queue)
            part = snap.get(kind, {}) if kind != CONSUMER else consumer_part(snap["wall"], snap.get(CONSUMER))
            for stage, seconds in part.items():
                out[kind][stage] = out[kind].get(stage, 0.0) + seconds
    return {kind: {s: out[kind][s] for s in STAGES if s in out[kind]} for kind in out}


def verdict(
    wall: Mapping[str, float] | None, wait_s: float, step_s: float
) -> tuple[str | None, float | None]:
    """(bound_by, share): `compute` with the wait's share of the step time, or the stage with the largest
    share of the reader time and that share, or (None, None) when the wait cannot be placed."""
    if step_s > 0 and wait_s < COMPUTE_BOUND * step_s:
        return "compute", max(0.0, wait_s) / step_s
    total = sum((wall or {}).values())
    if not wall or total <= 0:
        return None, None
    stage = max((s for s in STAGES if s in wall), key=lambda s: (wall[s], -STAGES.index(s)))
    return stage, wall[stage] / total


def consumer_part(wall: Mapping[str, float], consumer: Mapping[str, float] | None) -> dict[str, float]:
    """The wall seconds per stage on the consumer's path: what the loader marked (`consumer`), else the
    default consumer stages (transfer, queue) whole."""
    if consumer is not None:
        return {s: min(wall.get(s, 0.0), v) for s, v in consumer.items()}
    return {s: wall[s] for s in CONSUMER_STAGES if s in wall}


def _split(wall: Mapping[str, float], consumer: Mapping[str, float] | None) -> tuple[float, float]:
    """(reader seconds, consumer seconds) of an epoch's stages."""
    on_consumer = sum(consumer_part(wall, consumer).values())
    return max(0.0, sum(wall.values()) - on_consumer), on_consumer


def feed_rate(
    wall: Mapping[str, float],
    samples: int,
    readers: int,
    consumers: int = 1,
    consumer: Mapping[str, float] | None = None,
) -> float | None:
    """Images/s the data path could deliver with the step taking no time (MODEL); None if unknown.
    `consumer`: the loader's own split of the stages onto the consumer's path (loaders.stagetimes)."""
    reader_s, consumer_s = _split(wall, consumer)
    slowest = max(reader_s / readers, consumer_s / consumers)
    return samples / slowest if samples and slowest > 0 else None


def au90_rate(
    wall: Mapping[str, float],
    samples: int,
    readers: int,
    ranks: int = 1,
    consumer: Mapping[str, float] | None = None,
) -> float | None:
    """The accelerator rate (img/s per accelerator) where AU falls below AU_TARGET under MODEL."""
    if not samples:
        return None
    # Seconds per image each accelerator waits for: its share (samples / ranks) of the job's images
    # comes from the readers' elapsed time (reader seconds / readers) and its own consumer's seconds.
    reader_s, consumer_s = _split(wall, consumer)
    p = reader_s / readers / (samples / ranks)
    c = consumer_s / ranks / (samples / ranks)
    limits = [1 / (AU_TARGET * p)] if p > 0 else []
    limits += [(1 - AU_TARGET) / (AU_TARGET * c)] if c > 0 else []  # 1/A >= 9c
    return min(limits) if limits else None


def what_if(
    wall: Mapping[str, float],
    samples: int,
    readers: int,
    ranks: int = 1,
    consumer: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """run.json's `what_if`: the readers' feed rate as measured and the three what-if figures, each with
    its assumption. `readers`: reader threads or processes of the whole job; `ranks`: its consumers;
    `consumer`: the loader's own split of stage seconds onto the consumer's path, if it gave one."""
    on_consumer = consumer_part(wall, consumer)
    cached = {s: v for s, v in wall.items() if s != "storage"}
    cached_consumer = {s: v for s, v in on_consumer.items() if s != "storage"}
    # twice the readers: only the part of each stage that readers run halves
    doubled = {s: 0.5 * (v - on_consumer.get(s, 0.0)) + on_consumer.get(s, 0.0) for s, v in wall.items()}
    return {
        "model": MODEL,
        "readers": readers,
        "consumer_stages": sorted(s for s, v in on_consumer.items() if v > 0),
        "not_separable": [s for s in STAGES if s not in wall],
        "feed_img_per_s": feed_rate(wall, samples, readers, ranks, on_consumer),
        "cached": {
            "img_per_s": feed_rate(cached, samples, readers, ranks, cached_consumer),
            "assumption": ASSUMPTIONS["cached"],
        },
        "twice_readers": {
            "img_per_s": feed_rate(doubled, samples, readers, ranks, on_consumer),
            "assumption": ASSUMPTIONS["twice_readers"],
        },
        "au90_accelerator": {
            "img_per_s": au90_rate(wall, samples, readers, ranks, on_consumer),
            "assumption": ASSUMPTIONS["au90_accelerator"],
        },
    }


def steady(stats: Any) -> tuple[float, float]:
    """(wait, step) seconds of an epoch with its first batch left out (training.timing.EpochStats)."""
    first_fetch = stats.first_batch - stats.first_step
    return stats.loading - first_fetch, stats.compute - stats.first_step


def phase_stages(ranks: Sequence[Any], workers: int) -> dict[str, Any]:
    """The stage fields of an epoch's `train` or `val` record, from each rank's EpochStats (its
    `stages`): `stages` and `stages_cpu` summed over the ranks, `bound_by` and `bound_share` from the
    summed stages and the mean wait and step, `what_if`; under several ranks each rank's own go into
    its `ranks` entry (`per_rank`). Absent keys: nothing to report (see `verdict`)."""
    waits, steps = zip(*(steady(r) for r in ranks), strict=True)
    job = summed([r.stages for r in ranks])
    readers = max(1, workers) * len(ranks)
    out = _fields(
        job, sum(waits) / len(ranks), sum(steps) / len(ranks), sum(r.samples for r in ranks), readers
    )
    if job is not None:
        samples = sum(r.samples for r in ranks)
        out["what_if"] = what_if(job["wall"], samples, readers, len(ranks), job.get(CONSUMER))
    return out


def per_rank(stats: Any, workers: int) -> dict[str, Any]:
    """One rank's stage fields for its `ranks` entry (no what-if: those are the job's)."""
    wait, step = steady(stats)
    return _fields(stats.stages, wait, step, stats.samples, max(1, workers))


def _fields(stages: Snapshot | None, wait: float, step: float, samples: int, readers: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if stages is not None:
        out["stages"] = stages["wall"]
        out["stages_cpu"] = stages["cpu"]
    bound, share = verdict(stages["wall"] if stages else None, wait, step)
    if bound is not None:
        out["bound_by"] = bound
        out["bound_share"] = share
    return out


def verdict_text(record: Mapping[str, Any]) -> str | None:
    """`bound by decode (62% of reader time)` or `bound by compute (data wait 1.2% of step time)` for an
    epoch record, or None when it has no verdict."""
    bound, share = record.get("bound_by"), record.get("bound_share")
    if bound is None:
        return None
    if share is None:
        return f"bound by {bound}"
    if bound == "compute":
        return f"bound by compute (data wait {100 * share:.1f}% of step time)"
    return f"bound by {bound} ({100 * share:.0f}% of reader time)"
