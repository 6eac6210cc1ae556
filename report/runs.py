"""Reading runs back: the seed CSV (the contract) first, run.json (how the run was made) beside it.

Every figure the report shows can be recomputed from the CSV alone; run.json adds what the CSV cannot
say (loader name, storage, workers, samples per epoch, dataset kind). A folder without run.json still
reports, labelled by its directory name.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from feedrate.errors import FeedrateError
from feedrate.storage import scheme_of
from training.results import (
    CSV_HEADER,
    DOWNLOAD_TYPES,
    RUN_JSON_NAME,
    TRAIN_BATCH,
    TRAIN_EPOCH,
    VAL_EPOCH,
)

# The contract is written by training.results; reading it here from the same names keeps the two in step.
HEADER = list(CSV_HEADER)
_NUMBER = re.compile(r"(\d+(?:\.\d+)?(?:e[+-]?\d+)?)")


def natural_key(text: str) -> tuple[tuple[int, float | str], ...]:
    """A sort key that orders the numbers inside a label by value: `emu3000` before `emu100000`,
    `w2` before `w16` (plain string order puts them the other way round)."""
    return tuple((0, float(part)) if i % 2 else (1, part) for i, part in enumerate(_NUMBER.split(text)))


@dataclass
class EpochRow:
    epoch: int
    start: float
    loading: float
    duration: float
    top1: float | None
    top5: float | None


@dataclass
class BatchRow:
    epoch: int
    batch: int
    planned: int
    loading: float  # cumulative since epoch start
    duration: float  # cumulative since epoch start


@dataclass
class Run:
    """One training run: its CSV rows and its run.json (possibly empty)."""

    path: Path
    downloads: list[tuple[int, float, float, int]] = field(default_factory=list)  # type, loading, dur, n
    train: list[EpochRow] = field(default_factory=list)
    val: list[EpochRow] = field(default_factory=list)
    batches: list[BatchRow] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    suffix: str = ""  # set when two runs would otherwise share a label

    # -- what the run was ---------------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        return self.meta.get("config", {})

    @property
    def loader(self) -> str:
        return str(self.config.get("loader") or self.meta.get("loader", {}).get("name") or "?")

    @property
    def storage(self) -> str:
        data = self.config.get("data")
        return scheme_of(data).replace("file", "local") if data else "?"

    @property
    def net(self) -> str:
        """The network preset the run's data came through ("" when none was named)."""
        return str(self.config.get("net") or "")

    @property
    def emulate(self) -> float | None:
        value = self.config.get("emulate")
        return float(value) if value else None

    @property
    def kind(self) -> str:
        return str(self.meta.get("dataset", {}).get("kind", "?"))

    @property
    def label(self) -> str:
        return self.variant + self.suffix

    @property
    def variant(self) -> str:
        if not self.meta:
            return self.path.name
        where = f"{self.storage}@{self.net}" if self.net else self.storage
        parts = [self.loader, where, f"w{self.config.get('workers', '?')}"]
        if self.emulate:
            parts.append(f"emu{self.emulate:g}")
        return "/".join(parts)

    # -- figures --------------------------------------------------------------------------------------
    def batch_rows(self, epoch: int) -> list[BatchRow]:
        return [b for b in self.batches if b.epoch == epoch]

    def au(self, epoch: int) -> float | None:
        """Compute time / wall time, first batch excluded (MLPerf Storage): run.json's figure.

        run.json times the step itself; the CSV only knows wall and loading time, so without run.json
        AU is estimated as 1 - (loading / wall), which counts the loop's bookkeeping as compute (an
        upper bound).
        """
        for entry in self.meta.get("epochs", []):
            if entry.get("epoch") == epoch and entry.get("train", {}).get("au") is not None:
                return float(entry["train"]["au"])
        return self.au_from_csv(epoch)

    def au_from_csv(self, epoch: int) -> float | None:
        """1 - data wait over the epoch's type 2 rows after the first batch."""
        rows = self.batch_rows(epoch)
        if len(rows) < 2:
            return None
        wall = rows[-1].duration - rows[0].duration
        waited = rows[-1].loading - rows[0].loading
        return (wall - waited) / wall if wall > 0 else None

    def samples(self, epoch: int) -> int | None:
        for entry in self.meta.get("epochs", []):
            if entry.get("epoch") == epoch:
                return entry.get("train", {}).get("samples")
        return None

    def record(self, epoch: int, phase: str = "train") -> dict[str, Any]:
        """run.json's `train` or `val` record of an epoch ({} when it has none)."""
        for entry in self.meta.get("epochs", []):
            if entry.get("epoch") == epoch:
                return entry.get(phase) or {}
        return {}

    def stages(self, epoch: int) -> dict[str, float]:
        """Wall seconds per stage of the data path in a training epoch (run.json `stages`; {} when the
        loader reported none: an absent stage was not separable)."""
        return dict(self.record(epoch).get("stages") or {})

    def verdict(self, epoch: int) -> str:
        """`decode (62%)`, `compute (wait 1.2%)` or "" (run.json `bound_by`, `bound_share`)."""
        record = self.record(epoch)
        bound, share = record.get("bound_by"), record.get("bound_share")
        if not bound:
            return ""
        if share is None:
            return str(bound)
        return f"compute (wait {100 * share:.1f}%)" if bound == "compute" else f"{bound} ({100 * share:.0f}%)"

    def img_per_s(self, epoch: int) -> float | None:
        for entry in self.meta.get("epochs", []):
            if entry.get("epoch") == epoch:
                return entry.get("train", {}).get("img_per_s")
        return None


def _float(text: str) -> float | None:
    return float(text) if text.strip() else None


def read_csv(path: Path) -> Run:
    run = Run(path=path.parent)
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != HEADER:
            raise FeedrateError(f"{path} is not a feedrate CSV: header {header}, expected {HEADER}")
        for number, row in enumerate(reader, start=2):
            if len(row) != len(HEADER):
                raise FeedrateError(f"{path}:{number}: {len(row)} fields, expected {len(HEADER)}")
            kind, epoch = int(row[0]), int(row[1])
            start, loading, duration = float(row[2]), float(row[3]), float(row[4])
            if kind in DOWNLOAD_TYPES.values():
                run.downloads.append((kind, loading, duration, int(float(row[5]))))
            elif kind in (TRAIN_EPOCH, VAL_EPOCH):
                entry = EpochRow(epoch, start, loading, duration, _float(row[5]), _float(row[6]))
                (run.train if kind == TRAIN_EPOCH else run.val).append(entry)
            elif kind == TRAIN_BATCH:
                run.batches.append(BatchRow(epoch, int(row[5]), int(row[6]), loading, duration))
            else:
                raise FeedrateError(f"{path}:{number}: unknown row type {kind}")
    return run


def load_run(csv_path: Path) -> Run:
    run = read_csv(csv_path)
    meta = csv_path.parent / RUN_JSON_NAME
    if meta.exists():
        try:
            run.meta = json.loads(meta.read_text())
        except json.JSONDecodeError:
            run.meta = {}
    return run


def find_runs(paths: list[Path]) -> list[Run]:
    """Every run under the given folders (a run folder itself included), sorted by label with its
    numbers in numeric order (`natural_key`)."""
    found: list[Path] = []
    for path in paths:
        if not path.exists():
            raise FeedrateError(f"{path} does not exist")
        if path.is_file() and path.suffix == ".csv":
            found.append(path)
        else:
            found.extend(sorted(path.rglob("*.csv")))
    runs = []
    for csv_path in found:
        with open(csv_path, newline="") as f:
            first = f.readline().strip()
        if first == ",".join(HEADER):
            runs.append(load_run(csv_path))
    if not runs:
        raise FeedrateError(f"no feedrate CSV under {', '.join(str(p) for p in paths)}")
    runs.sort(key=lambda r: (natural_key(r.variant), natural_key(str(r.path))))
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.variant] = counts.get(run.variant, 0) + 1
    for run in runs:
        if counts[run.variant] > 1:
            run.suffix = f" ({run.path.name})"
    return runs
