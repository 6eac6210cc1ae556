"""A debugging aid: which samples each rank trained and evaluated on (FEEDRATE_TRACE_SAMPLES).

With FEEDRATE_TRACE_SAMPLES=PATH every rank appends, per batch, its split, epoch, labels and each image's
centre pixel (normalised) as one JSON line to PATH.rank<R>. The tests run it on images whose pixels
encode their sample index (tests/encoded.py) to see that the ranks' parts are disjoint and whole. It
copies every batch to the host inside the step: never use it for measurements.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

TRACE_ENV = "FEEDRATE_TRACE_SAMPLES"

Step = Callable[[torch.Tensor, torch.Tensor], None]


def trace_path(environ: Mapping[str, str], rank: int) -> Path | None:
    """This rank's trace file, or None when FEEDRATE_TRACE_SAMPLES is unset or blank."""
    trace = environ.get(TRACE_ENV, "").strip()
    return Path(f"{trace}.rank{rank}") if trace else None


def traced(step: Step, path: Path | None, rank: int, split: str, epoch: int) -> Step:
    """`step`, first appending the batch's identity to `path` (None: `step` itself, untouched)."""
    if path is None:
        return step

    def run(images: torch.Tensor, labels: torch.Tensor) -> None:
        centre = images[:, :, images.shape[2] // 2, images.shape[3] // 2].float().cpu()
        line = {"rank": rank, "split": split, "epoch": epoch, "labels": labels.tolist()}
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line | {"centre": centre.tolist()}) + "\n")
        step(images, labels)

    return run
