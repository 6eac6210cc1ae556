"""training.timing and training.results: the recorder's arithmetic, the CSV's format, run.json's writing."""

from __future__ import annotations

import csv
import io
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from feedrate.errors import FeedrateError
from training import results
from training.timing import Clock, EpochStats, EpochTimer, combine


class FakeClock:
    """A clock that moves only when told to, and counts device synchronisations."""

    def __init__(self) -> None:
        self.t = 100.0
        self.syncs = 0

    def perf(self) -> float:
        return self.t

    def sync(self) -> None:
        self.syncs += 1


def timed_epoch(spans: list[tuple[float, float]], gap: float = 0.0) -> tuple[EpochTimer, FakeClock]:
    """An epoch whose batches take (loading, step) seconds each, with `gap` of bookkeeping between."""
    fake = FakeClock()
    timer = EpochTimer(Clock(sync=fake.sync, perf=fake.perf, wall=lambda: 1_700_000_000.0))
    for loading, step in spans:
        fake.t += gap

        def get(loading: float = loading) -> str:
            fake.t += loading
            return "batch"

        assert timer.fetch(get) == "batch"
        fake.t += step
        timer.end_step(samples=10)
    return timer, fake


def test_timer_cumulative_figures_and_au_without_first_batch() -> None:
    timer, fake = timed_epoch([(2.0, 1.0), (0.5, 1.0), (0.5, 1.0), (0.0, 1.0)])
    cum = [(b.cum_loading, b.cum_duration) for b in timer.batches]
    assert cum == [(2.0, 3.0), (2.5, 4.5), (3.0, 6.0), (3.0, 7.0)]
    assert [b.index for b in timer.batches] == [1, 2, 3, 4]
    stats = timer.stats()
    assert stats.duration == 7.0 and stats.loading == 3.0 and stats.compute == 4.0
    assert stats.samples == 40 and stats.img_per_s == pytest.approx(40 / 7)
    assert stats.data_wait_fraction == pytest.approx(3 / 7)
    # First batch (3 s, of which 1 s step) excluded: 3 s compute over 4 s wall.
    assert stats.au == pytest.approx(0.75)
    assert fake.syncs >= 2 * len(timer.batches)  # the device is synchronised before every reading


def test_bookkeeping_between_batches_is_wall_time_but_not_compute() -> None:
    timer, _ = timed_epoch([(0.0, 1.0), (0.0, 1.0), (0.0, 1.0)], gap=0.25)
    stats = timer.stats()
    assert stats.duration == pytest.approx(3.75)
    assert stats.au == pytest.approx(2.0 / 2.5)


def test_au_is_undefined_for_one_batch_and_combine_skips_such_epochs() -> None:
    one, _ = timed_epoch([(1.0, 1.0)])
    assert one.stats().au is None
    many, _ = timed_epoch([(1.0, 1.0), (1.0, 1.0)])
    total = combine([one.stats(), many.stats()])
    assert total["au"] == pytest.approx(0.5)
    assert total["img_per_s"] == pytest.approx(30 / 6)
    assert total["data_wait_fraction"] == pytest.approx(3 / 6)
    assert combine([]) == {"img_per_s": None, "data_wait_fraction": None, "au": None}


def test_csv_rows_match_the_seed_format(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    timer, _ = timed_epoch([(0.1234567, 1.0), (0.0, 1.0)])
    with results.CsvLog(path) as log:
        log.download("train", 1_700_000_000.5, 1.5, 2.25, 50_000)
        log.download("test", 1_700_000_003.0, 0.5, 0.75, 10_000)
        assert path.read_text().count("\n") == 3  # download rows are on disk as soon as logged
        for batch in timer.batches:
            log.batch(1, timer.start, batch, 2)
        log.epoch(results.TRAIN_EPOCH, 1, timer.stats(), 0.5, 0.875)
        # An epoch row is on disk when logged, after the batch rows logged before it.
        assert path.read_text().count("\n") == 6
        log.epoch(results.VAL_EPOCH, 1, timer.stats(), None, None)
    assert path.read_text().splitlines() == [
        "type,epoch,start,loading,duration,value1,value2",
        "10,0,1700000000.500000,1.500000,2.250000,50000,",
        "11,0,1700000003.000000,0.500000,0.750000,10000,",
        "2,1,1700000000.000000,0.123457,1.123457,1,2",
        "2,1,1700000000.000000,0.123457,2.123457,2,2",
        "0,1,1700000000.000000,0.123457,2.123457,0.500000,0.875000",
        "1,1,1700000000.000000,0.123457,2.123457,,",
    ]


def test_batch_rows_reach_the_file_by_the_writer_thread_and_close_writes_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    timer, _ = timed_epoch([(0.5, 1.0)] * 3)
    log = results.CsvLog(path)
    log.batch(1, timer.start, timer.batches[0], 3)
    deadline = time.monotonic() + 30  # the writer flushes every FLUSH_S; this only bounds a hang
    while path.read_text().count("\n") < 2 and time.monotonic() < deadline:
        time.sleep(results.FLUSH_S / 4)
    assert path.read_text().splitlines()[1] == "2,1,1700000000.000000,0.500000,1.500000,1,3"
    for batch in timer.batches[1:]:
        log.batch(1, timer.start, batch, 3)
    log.close()
    log.close()  # twice is harmless
    assert [line.split(",")[5] for line in path.read_text().splitlines()[1:]] == ["1", "2", "3"]


def test_format_row_writes_what_csv_writer_would() -> None:
    rows = [(2, 1, 1_700_000_000.123, 0.1234567, 2.0, 3, 400), (0, 2, 1.0, 0.0, 0.0, 0.5, None)]
    for row in rows:
        line = io.StringIO()
        csv.writer(line, lineterminator="\n").writerow(
            [row[0], row[1], *(f"{t:.6f}" for t in row[2:5]), *(results._value(v) for v in row[5:])]
        )
        assert results.format_row(row) == line.getvalue()


def test_a_write_error_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = results.CsvLog(tmp_path / "train.csv")
    timer, _ = timed_epoch([(0.5, 1.0)])

    def full(data: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(log, "_file", type("Full", (), {"write": staticmethod(full), "closed": False})())
    with pytest.raises(FeedrateError, match=r"cannot write .*train.csv: No space left on device"):
        log.epoch(results.TRAIN_EPOCH, 1, timer.stats(), None, None)
    monkeypatch.undo()
    log.close()  # the writer thread stops


def test_json_written_atomically_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    results.write_json_atomic(path, {"status": "running", "n": 1})
    results.write_json_atomic(path, {"status": "complete", "path": tmp_path})
    assert json.loads(path.read_text()) == {"status": "complete", "path": str(tmp_path)}
    assert os.listdir(tmp_path) == ["run.json"]


def test_json_written_atomically_is_durable_its_directory_fsynced_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run.json is what a resume continues from: without a fsync of its directory after the rename, a
    power cut may bring back the old name's file though the new data were on disk."""
    path = tmp_path / "run.json"
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        real_replace(src, dst)
        events.append(("rename", str(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    results.write_json_atomic(path, {"status": "running"})
    assert json.loads(path.read_text()) == {"status": "running"}
    assert [kind for kind, _ in events] == ["fsync", "rename", "fsync"]
    assert events[0][1].endswith(".tmp") and events[1][1] == str(path)
    assert events[2][1] == str(tmp_path.resolve()), "the directory holding the new name, after the rename"


def test_json_write_that_fails_keeps_the_old_document(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    results.write_json_atomic(path, {"status": "running"})
    with pytest.raises(ValueError):
        results.write_json_atomic(path, {"loop": _Circular()})
    assert json.loads(path.read_text()) == {"status": "running"}
    assert os.listdir(tmp_path) == ["run.json"]


class _Circular:
    """Serialised by `default=str`... unless str() itself fails."""

    def __str__(self) -> str:
        raise ValueError("cannot serialise")


def test_provenance_names_versions_and_machine(tmp_path: Path) -> None:
    versions = results.library_versions()
    assert {"python", "feedrate", "torch", "torchvision"} <= set(versions)
    assert results.machine()["cpu_count"] >= 1
    assert results.git_state(tmp_path) == {"commit": None, "dirty": None}
    assert isinstance(EpochStats(0.0, 0, 0, 0.0, 0.0, 0.0, 0.0).as_dict(), dict)
