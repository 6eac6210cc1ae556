"""Results of a training run: the seed's CSV (exact) and run.json, the sidecar that says how it was made.

The CSV is the seed study's format, fixed (report/ and outside checks read it): header
`type,epoch,start,loading,duration,value1,value2`, times with 6 decimals, one row per event, each
flushed as written. A row is formatted whole and handed to one `write` call, so an interrupted run
leaves only complete rows.

run.json is rewritten atomically (temporary file, then rename) after every epoch and at the end, so a
reader always sees a whole document; its `status` says whether the run completed.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from feedrate import __version__
from feedrate.errors import FeedrateError
from feedrate.files import atomic_path
from training.timing import BatchTime, EpochStats

CSV_NAME = "train.csv"
RUN_JSON_NAME = "run.json"
CSV_HEADER = ("type", "epoch", "start", "loading", "duration", "value1", "value2")

# Row types of the seed's CSV.
TRAIN_EPOCH = 0
VAL_EPOCH = 1
TRAIN_BATCH = 2
DOWNLOAD_TYPES = {"train": 10, "test": 11}  # downloading training / validation data


def _time(seconds: float) -> str:
    return f"{seconds:.6f}"


def _value(value: float | int | None) -> str:
    if value is None:
        return ""
    if isinstance(value, int):
        return str(value)
    return f"{value:.6f}"


class CsvLog:
    """Appends the seed's rows to a CSV file, flushing each one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "w", newline="", encoding="ascii")  # noqa: SIM115 - closed by close()
        self._write(CSV_HEADER)

    def _write(self, fields: tuple[str, ...]) -> None:
        line = io.StringIO()
        csv.writer(line, lineterminator="\n").writerow(fields)
        try:
            self._file.write(line.getvalue())
            self._file.flush()
        except OSError as exc:  # a full disk or quota: say which file, not just the errno
            raise FeedrateError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def row(
        self,
        kind: int,
        epoch: int,
        start: float,
        loading: float,
        duration: float,
        value1: float | int | None,
        value2: float | int | None,
    ) -> None:
        self._write(
            (
                str(kind),
                str(epoch),
                _time(start),
                _time(loading),
                _time(duration),
                _value(value1),
                _value(value2),
            )
        )

    def download(self, split: str, start: float, loading: float, duration: float, samples: int) -> None:
        """A type 10 (training data) or 11 (validation data) row."""
        self.row(DOWNLOAD_TYPES[split], 0, start, loading, duration, samples, None)

    def batch(self, epoch: int, start: float, batch: BatchTime, planned: int) -> None:
        """A type 2 row: cumulative loading and wall time since the epoch's start."""
        self.row(TRAIN_BATCH, epoch, start, batch.cum_loading, batch.cum_duration, batch.index, planned)

    def epoch(self, kind: int, epoch: int, stats: EpochStats, top1: float | None, top5: float | None) -> None:
        """A type 0 (training) or 1 (validation) row."""
        self.row(kind, epoch, stats.start, stats.loading, stats.duration, top1, top5)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> CsvLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NoLog:
    """CsvLog's interface, writing nothing: the log of every rank but 0 under torchrun, so the training
    loop has one code path and exactly one process writes the CSV."""

    def download(self, split: str, start: float, loading: float, duration: float, samples: int) -> None:
        pass

    def batch(self, epoch: int, start: float, batch: BatchTime, planned: int) -> None:
        pass

    def epoch(self, kind: int, epoch: int, stats: EpochStats, top1: float | None, top5: float | None) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> NoLog:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def write_json_atomic(path: Path, document: dict[str, Any]) -> None:
    """Write `document` to `path` atomically (`feedrate.files.atomic_path`)."""
    try:
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(document, f, indent=2, default=str)
            f.write("\n")
    except OSError as exc:
        raise FeedrateError(f"cannot write {path}: {exc.strerror or exc}") from None


# -- provenance ---------------------------------------------------------------------------------------

# Distributions whose versions a result depends on; DALI ships under a CUDA-specific name.
VERSIONED = ("torch", "torchvision", "numpy", "pillow", "webdataset", "boto3", "ibm-cos-sdk")
DALI_DISTRIBUTIONS = ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110", "nvidia-dali")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape the figures (absent ones are left out)."""
    versions = {"python": platform.python_version(), "feedrate": __version__}
    for name in VERSIONED:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    for name in DALI_DISTRIBUTIONS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions["dali"] = f"{metadata.version(name)} ({name})"
            break
    return versions


def git_state(repo: Path) -> dict[str, Any]:
    """The commit of the code that ran and whether the tree had local changes (None outside git)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def cpu_name() -> str:
    """The CPU model as the kernel reports it (platform.processor() is often just the architecture)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device: Any) -> str:
    """A torch device's product name: the GPU's, or the CPU model."""
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    return cpu_name()


def machine() -> dict[str, Any]:
    """The host: CPU counts (all, and usable by this process), platform, Python executable."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable,
        "platform": platform.platform(),
        "processor": cpu_name(),
        "python": sys.executable,
    }
