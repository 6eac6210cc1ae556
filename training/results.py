"""Results of a training run: the seed's CSV (exact) and run.json, the sidecar that says how it was made.

The CSV is the seed study's format, fixed (report/ and outside checks read it): header
`type,epoch,start,loading,duration,value1,value2`, times with 6 decimals, one row per event, in order;
epoch and download rows are flushed as written, batch rows within 100 ms by a writer thread off the
training loop's path (CsvLog says why). Rows are written whole, so an interrupted run leaves only
complete rows.

run.json is rewritten atomically (temporary file, then rename) after every epoch and at the end, so a
reader always sees a whole document; its `status` says whether the run completed.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import platform
import subprocess
import sys
import threading
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


def _value(value: float | int | None) -> str:
    if value is None:
        return ""
    if isinstance(value, int):
        return str(value)
    return f"{value:.6f}"


Row = tuple[int, int, float, float, float, "float | int | None", "float | int | None"]


def format_row(row: Row) -> str:
    """One CSV line (newline included): the seed's fields, times with 6 decimals. Its fields are numbers
    or empty, which CSV never quotes, so the line is what csv.writer would write, at a third of its cost."""
    kind, epoch, start, loading, duration, value1, value2 = row
    return f"{kind},{epoch},{start:.6f},{loading:.6f},{duration:.6f},{_value(value1)},{_value(value2)}\n"


# Longest a logged batch row waits before it is written and flushed (the writer thread's period).
FLUSH_S = 0.1


class CsvLog:
    """Appends the seed's rows to a CSV file, in the order they are logged, each flushed as it happens.

    "As it happens" has one relaxation, so that the harness costs the accelerator nothing measurable:
    a batch row (type 2) is handed to a writer thread, which writes and flushes it within FLUSH_S
    (100 ms) while the step runs; every other row (downloads, epochs) and `close()` write and flush at
    once, after everything logged before them. So a training loop's batch costs one deque append here
    (about 1 us instead of 5-40 us for a formatted, flushed write on the critical path), a finished
    epoch is on disk when its row is logged, and a process killed outright loses at most the last
    100 ms of batch rows, never a partial one: rows are written whole (several at a time, one `write`
    call on an unbuffered file). A write error (full disk) is a FeedrateError naming the file, raised
    by the next row or by `close()`.

    `resume_at=(offset, sha256)` continues a CSV a checkpoint described (training.checkpoint): the file's
    first `offset` bytes must have that sha256; what follows them (rows logged after the checkpoint by a
    process that was then killed) is cut, `cut_rows` counts those, and rows are appended from there.
    `mark()` gives a checkpoint that pair: every row logged so far on disk (flushed and fsynced).
    """

    def __init__(self, path: Path, resume_at: tuple[int, str] | None = None) -> None:
        self.path = path
        self._digest = hashlib.sha256()  # of everything written: what mark() reports
        self.cut_rows = 0
        if resume_at is None:
            self._file = open(path, "wb", buffering=0)  # noqa: SIM115 - closed by close()
        else:
            self._file = self._continue(*resume_at)
        self._pending: collections.deque[Row] = collections.deque()  # append/popleft: thread-safe
        self._lock = threading.Lock()  # one writer at a time: rows reach the file in logged order
        self._error: FeedrateError | None = None
        self._stop = threading.Event()
        try:
            if resume_at is None:
                self._write_lines([",".join(CSV_HEADER) + "\n"])
        except BaseException:
            self._file.close()  # no thread to close it yet
            raise
        self._thread = threading.Thread(target=self._run, name=f"csvlog {path.name}", daemon=True)
        self._thread.start()

    def _continue(self, offset: int, sha256: str) -> Any:
        """The existing file, checked against the checkpoint's prefix, cut there, positioned to append."""
        try:
            f = open(self.path, "r+b", buffering=0)  # noqa: SIM115 - closed by close()
        except OSError as exc:
            raise FeedrateError(f"--resume: cannot open {self.path}: {exc.strerror or exc}") from None
        try:
            prefix = f.read(offset)
            header = (",".join(CSV_HEADER) + "\n").encode()
            if len(prefix) < offset or not prefix.startswith(header) or not prefix.endswith(b"\n"):
                raise FeedrateError(
                    f"--resume: {self.path} has {len(prefix)} bytes of this run's rows; its checkpoint "
                    f"recorded {offset}"
                )
            self._digest.update(prefix)
            if self._digest.hexdigest() != sha256:
                raise FeedrateError(f"--resume: {self.path} changed since its checkpoint (the rows' sha256)")
            self.cut_rows = sum(1 for line in f.read().split(b"\n") if line.startswith(b"%d," % TRAIN_BATCH))
            f.truncate(offset)
            f.seek(offset)
        except BaseException:
            f.close()
            raise
        return f

    def mark(self) -> tuple[int, str]:
        """(bytes, sha256) of the file with every row logged so far written, flushed and fsynced."""
        self._raise_writer_error()
        self._drain()
        with self._lock:
            try:
                os.fsync(self._file.fileno())
            except OSError as exc:
                raise FeedrateError(f"cannot write {self.path}: {exc.strerror or exc}") from None
            return self._file.tell(), self._digest.hexdigest()

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_S):
            try:
                self._drain()
            except FeedrateError as exc:
                self._error = exc
                return

    def _drain(self, *then: Row) -> None:
        """Write every pending row, then `then`, in one write; flushed (the file has no buffer)."""
        with self._lock:
            rows = [self._pending.popleft() for _ in range(len(self._pending))]
            self._write_lines([format_row(r) for r in (*rows, *then)])

    def _write_lines(self, lines: list[str]) -> None:
        encoded = "".join(lines).encode("ascii")
        data = memoryview(encoded)
        try:
            while data:
                data = data[self._file.write(data) :]
        except OSError as exc:  # a full disk or quota: say which file, not just the errno
            raise FeedrateError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        self._digest.update(encoded)

    def _raise_writer_error(self) -> None:
        if self._error is not None:
            raise self._error

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
        """Write one row now (after every pending batch row)."""
        self._raise_writer_error()
        self._drain((kind, epoch, start, loading, duration, value1, value2))

    def download(self, split: str, start: float, loading: float, duration: float, samples: int) -> None:
        """A type 10 (training data) or 11 (validation data) row."""
        self.row(DOWNLOAD_TYPES[split], 0, start, loading, duration, samples, None)

    def batch(self, epoch: int, start: float, batch: BatchTime, planned: int) -> None:
        """A type 2 row: cumulative loading and wall time since the epoch's start (written within
        FLUSH_S by the writer thread)."""
        if self._error is not None:
            raise self._error
        self._pending.append(
            (TRAIN_BATCH, epoch, start, batch.cum_loading, batch.cum_duration, batch.index, planned)
        )

    def epoch(self, kind: int, epoch: int, stats: EpochStats, top1: float | None, top5: float | None) -> None:
        """A type 0 (training) or 1 (validation) row."""
        self.row(kind, epoch, stats.start, stats.loading, stats.duration, top1, top5)

    def close(self) -> None:
        """Stop the writer thread, write what is pending, close the file. Safe to call twice."""
        if self._file.closed:
            return
        self._stop.set()
        self._thread.join()
        try:
            self._raise_writer_error()
            self._drain()
        finally:
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

    def mark(self) -> tuple[int, str]:
        return (0, hashlib.sha256().hexdigest())

    def __enter__(self) -> NoLog:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def write_json_atomic(path: Path, document: dict[str, Any]) -> None:
    """Write `document` to `path` atomically and durably (`feedrate.files.atomic_path` with `sync_dir`:
    run.json is what a resume continues from, so its rename must survive a crash as the data do)."""
    try:
        with atomic_path(path, sync_dir=True) as tmp, open(tmp, "w", encoding="utf-8") as f:
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
