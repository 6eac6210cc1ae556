"""The training loop's own cost, measured with a loader that costs nothing: `python -m tests.harness_cost`.

`RepeatBatch` hands over one ready batch again and again (no reading, no decoding, no copy), so whatever
keeps an emulated accelerator from being busy is the harness itself: train.run_epoch's clock reads, the
CSV row per batch (training.results.CsvLog), the progress bar and the interrupt check. Two figures:

- per-batch harness cost (us): the loop's wall time per batch with a step that does nothing;
- AU at an emulated RATE img/s (default 100,000: a 2.56 ms step at batch 256), as train.py reports it.

It is a benchmark, not a test: the figures depend on the machine and its load (tests only check that the
path runs). It is not a product loader either: train.py's `--loader` never offers it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

import train
from training.models import Stepper
from training.results import CsvLog
from training.timing import BatchTime, Clock, EpochStats, EpochTimer


class RepeatBatch:
    """One batch of `batch_size` CIFAR-shaped images, handed over `batches` times per epoch."""

    def __init__(self, batches: int, batch_size: int = 256) -> None:
        self.batches = batches
        self.images = torch.zeros(batch_size, 3, 32, 32)
        self.labels = torch.zeros(batch_size, dtype=torch.int64)
        self.samples = batches * batch_size

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pair = (self.images, self.labels)
        for _ in range(self.batches):
            yield pair


def run_once(rate: float | None, batches: int, out: Path, batch_size: int = 256) -> EpochStats:
    """One epoch of train.run_epoch as train.py runs it on rank 0 (CSV log, bar on): `rate` None runs a
    step that does nothing, else the emulated accelerator at `rate` img/s."""
    loader = RepeatBatch(batches, batch_size)
    if rate is None:

        def step(images: torch.Tensor, labels: torch.Tensor) -> None:
            pass

    else:
        stepper = Stepper(
            "small", 10, torch.device("cpu"), lr=0.1, batch_size=batch_size, total_steps=1, emulate=rate
        )
        step = stepper.train_step
    with CsvLog(out / "train.csv") as log:

        def log_batch(timer: EpochTimer, batch: BatchTime) -> None:
            log.batch(1, timer.start, batch, batches)

        return train.run_epoch(loader, batches, step, Clock(), "harness", log_batch)


def measure(rate: float, batches: int, repeats: int) -> dict[str, float]:
    """Median over `repeats` epochs: the per-batch harness cost (us) and AU at `rate` img/s."""
    costs, aus = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            idle = run_once(None, batches, Path(tmp))
            costs.append(1e6 * idle.duration / idle.batches)
            busy = run_once(rate, batches, Path(tmp))
            aus.append(busy.au or 0.0)
    return {"rate": rate, "us_per_batch": statistics.median(costs), "au": statistics.median(aus)}


def main() -> None:
    p = argparse.ArgumentParser(prog="tests.harness_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=100_000.0, help="emulated accelerator img/s")
    p.add_argument("--batches", type=int, default=400, help="batches per measured epoch")
    p.add_argument("--repeats", type=int, default=5, help="epochs measured (the median is reported)")
    args = p.parse_args()
    started = time.perf_counter()
    m = measure(args.rate, args.batches, args.repeats)
    print(
        f"harness cost {m['us_per_batch']:.1f} us per batch; AU {100 * m['au']:.2f}% at an emulated "
        f"{m['rate']:,.0f} img/s ({args.repeats} x {args.batches} batches, median; "
        f"{time.perf_counter() - started:.0f} s)"
    )


if __name__ == "__main__":
    main()
