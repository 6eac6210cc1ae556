"""training.checkpoint: the atomic write (a real SIGKILL half-way), which checkpoint is chosen, what is passed
over (a .tmp directory, a bad sha256, a cut file), what is refused (bad values, changed settings, a tensor
file that would run code), rotation; and the pieces a resume puts back (the CSV, the Stepper, the
generators, the schedule)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from feedrate.errors import FeedrateError
from training import checkpoint
from training.checkpoint import META, TENSORS, checkpoint_name, latest, save, validate
from training.models import Stepper
from training.results import CSV_HEADER, CsvLog
from training.timing import BatchTime, EpochStats

REPO = Path(__file__).resolve().parents[1]
STATS = {"start": 1.0, "batches": 3, "samples": 30, "loading": 0.1, "duration": 1.0, "compute": 0.8}
STATS |= {"first_batch": 0.2, "first_step": 0.1, "stages": None}


def good_meta(phase: str = "val", epoch: int = 1, world_size: int = 1) -> dict[str, Any]:
    """A checkpoint's metadata as train.py writes it (format, version, step and tensors are added by save)."""
    meta: dict[str, Any] = {
        "epoch": epoch,
        "batch": 4,
        "phase": phase,
        "config": {key: 1 for key in checkpoint.FROZEN.values()} | {"epochs": 3},
        "workers": 2,
        "world_size": world_size,
        "schedule": {"step": 4, "total": 12},
        "out": "/somewhere/run",
        "csv": {"offset": 200, "sha256": "0" * 64},
        "doc": {"epochs": [{"epoch": e} for e in range(1, epoch + (phase == "val"))]},
        "trained": [[dict(STATS)] * world_size] * (epoch - (phase == "train")),
        "counters": {"train": {"bytes_read": 10}},
        "rng": [checkpoint.host_rng()] * world_size,
        "loader_state": None,
    }
    if phase == "train":
        meta |= {
            "loader_state": {"epoch": epoch},
            "epoch_ranks": [dict(STATS)] * world_size,
            "accuracy": [1, 2, 30],
            "parts": [],
        }
    return meta


def tensors(value: float = 1.0) -> dict[str, Any]:
    return {"stepper": {"model": {"w": torch.full((3, 2), value)}}, "rng": [{"cpu": torch.get_rng_state()}]}


def written(directory: Path, step: int, phase: str = "val") -> Path:
    return save(directory, step, tensors(float(step)), good_meta(phase))


def complete_meta(path: Path) -> dict[str, Any]:
    return json.loads((path / META).read_text())


# -- writing and choosing ------------------------------------------------------------------------------
def test_a_checkpoint_round_trips_and_names_its_tensor_files_digest(tmp_path: Path) -> None:
    path = written(tmp_path, 7)
    assert path == tmp_path / "ckpt-000000000007" and sorted(os.listdir(path)) == [META, TENSORS]
    found = latest(tmp_path)
    assert found is not None and found.path == path and found.step == 7
    data = (path / TENSORS).read_bytes()
    assert found.meta["tensors"] == {
        "file": TENSORS,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    assert found.meta["format"] == checkpoint.FORMAT and found.meta["version"] == checkpoint.VERSION
    loaded = found.tensors()
    assert torch.equal(loaded["stepper"]["model"]["w"], torch.full((3, 2), 7.0))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")], "nothing temporary is left"


def test_the_newest_complete_checkpoint_is_chosen_and_a_tmp_directory_never(tmp_path: Path) -> None:
    written(tmp_path, 5)
    newer = written(tmp_path, 9)
    # a later save cut before its rename: whole files, but under a .tmp name (and a higher step)
    shutil.copytree(newer, tmp_path / ".tmp-000000000012-abc")
    assert latest(tmp_path).step == 9
    assert latest(tmp_path / "missing") is None and latest(tmp_path / ".tmp-000000000012-abc") is None


@pytest.mark.parametrize(
    ("damage", "note"),
    [
        ("flip a byte of tensors.pt", "sha256"),
        ("cut tensors.pt", "bytes"),
        ("cut meta.json", "unreadable or cut"),
        ("remove meta.json", "no meta.json"),
        ("remove tensors.pt", "no tensors.pt"),
    ],
)
def test_a_damaged_checkpoint_is_passed_over_with_a_note(tmp_path: Path, damage: str, note: str) -> None:
    written(tmp_path, 3)
    newest = written(tmp_path, 6)
    target = newest / (META if "meta" in damage else TENSORS)
    data = target.read_bytes()
    if damage.startswith("flip"):
        target.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    elif damage.startswith("cut"):
        target.write_bytes(data[: len(data) // 2])
    else:
        target.unlink()
    notes: list[str] = []
    found = latest(tmp_path, notes.append)
    assert found is not None and found.step == 3, "the older complete one is resumed from"
    assert len(notes) == 1 and str(newest) in notes[0] and note in notes[0], notes
    shutil.rmtree(tmp_path / checkpoint_name(3))
    with pytest.raises(FeedrateError) as refused:
        latest(tmp_path)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"no complete checkpoint in {tmp_path}"), message
    assert f"{newest.name}: " in message and note in message, "each one named, with what is wrong with it"


def test_a_directory_whose_every_checkpoint_is_damaged_is_an_error_not_a_fresh_start(tmp_path: Path) -> None:
    """A fresh start would delete the run's train.csv and run.json; only an empty DIR starts afresh."""
    for path in [written(tmp_path, 3), written(tmp_path, 6)]:
        (path / TENSORS).write_bytes(b"cut")
    notes: list[str] = []
    with pytest.raises(FeedrateError, match=r"no complete checkpoint .*holds 2 \(ckpt-000000000006: .*bytes"):
        latest(tmp_path, notes.append)
    assert len(notes) == 2
    assert latest(tmp_path / "empty") is None
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".tmp-000000000009-x").mkdir()  # a save cut before its rename is not one
    assert latest(tmp_path / "empty") is None


def test_an_oversized_meta_json_is_refused_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written(tmp_path, 3)
    newest = written(tmp_path, 6)
    monkeypatch.setattr(checkpoint, "META_MAX_BYTES", 4096)
    with open(newest / META, "a") as f:
        f.write(" " * 5000)  # still valid JSON, and its tensor file whole
    with pytest.raises(FeedrateError, match=f"{newest}: meta.json is over 4096 bytes"):
        latest(tmp_path)


@pytest.mark.parametrize(
    ("doc", "restart"),
    [
        ({}, True),
        ({"status": "running", "epochs": []}, True),
        ({"status": "complete", "epochs": []}, False),
        ({"status": "interrupted", "epochs": [{"epoch": 1}]}, False),
        ({"status": "running", "epochs": [], "resumed": [{"at": "then"}]}, False),
    ],
)
def test_only_a_run_killed_before_its_first_checkpoint_is_started_over(
    tmp_path: Path, doc: dict[str, Any], restart: bool
) -> None:
    from types import SimpleNamespace

    from training.runstate import restartable

    ckpt, out = tmp_path / "ck", tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps(doc | {"config": {"checkpoint_dir": str(ckpt)}}))
    cfg = SimpleNamespace(resume=True, checkpoint_dir=ckpt)
    assert restartable(cfg, out) is restart
    (out / "run.json").write_text(json.dumps(doc | {"config": {"checkpoint_dir": str(tmp_path / "other")}}))
    assert restartable(cfg, out) is False, "another command's results are never started over"


def test_a_tensor_file_changed_after_it_was_found_is_refused(tmp_path: Path) -> None:
    written(tmp_path, 2)
    found = latest(tmp_path)
    (found.path / TENSORS).write_bytes(b"x" * found.meta["tensors"]["bytes"])
    with pytest.raises(FeedrateError, match="changed since it was found"):
        found.tensors()


def test_rotation_keeps_the_two_newest_and_clears_temporary_directories(tmp_path: Path) -> None:
    (tmp_path / ".tmp-000000000001-stale").mkdir()
    (tmp_path / ".tmp-000000000001-stale" / TENSORS).write_bytes(b"cut")
    for step in (1, 2, 3, 4):
        written(tmp_path, step)
    assert sorted(os.listdir(tmp_path)) == [checkpoint_name(3), checkpoint_name(4)]
    written(tmp_path, 4)  # the same step again (replaced whole)
    assert sorted(os.listdir(tmp_path)) == [checkpoint_name(3), checkpoint_name(4)]


def test_a_cut_checkpoint_does_not_count_as_one_of_the_two_kept(tmp_path: Path) -> None:
    written(tmp_path, 1)
    cut = written(tmp_path, 2)
    (cut / TENSORS).write_bytes(b"cut")
    written(tmp_path, 3)
    assert sorted(os.listdir(tmp_path)) == [checkpoint_name(1), checkpoint_name(3)]


SAVER = """
import sys, torch
from pathlib import Path
sys.path.insert(0, {repo!r})
from tests.test_checkpoint import good_meta
from training.checkpoint import save
save(Path(sys.argv[1]), int(sys.argv[2]), {{"big": torch.ones(1 << 20)}}, good_meta())
"""


def test_a_save_killed_before_its_rename_leaves_the_last_complete_checkpoint_chosen(tmp_path: Path) -> None:
    written(tmp_path, 4)
    env = {**os.environ, checkpoint.PAUSE_ENV: "60", "PYTHONPATH": str(REPO)}
    code = SAVER.format(repo=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), "8"], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(f".tmp-*/{META}")):  # both files written and fsynced: in the pause
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    (cut,) = tmp_path.glob(".tmp-*")
    assert checkpoint_name(8)[5:] in cut.name and (cut / TENSORS).stat().st_size > 1 << 22
    assert latest(tmp_path).step == 4, "the cut save is never the one resumed from"
    written(tmp_path, 9)
    assert sorted(os.listdir(tmp_path)) == [checkpoint_name(4), checkpoint_name(9)], "the next save clears it"


def test_saves_killed_at_random_moments_never_leave_a_torn_checkpoint_chosen(tmp_path: Path) -> None:
    """No test seam: a process saving 8 MiB checkpoints back to back is SIGKILLed at seeded random
    moments (in a write, an fsync, a rename or the rotation, wherever it is); after each kill the newest
    complete checkpoint is whole, holds what its step wrote, and is never older than one seen before.
    The saver is a fork of this process (no interpreter start per kill)."""
    rng = random.Random("random kills")
    big = torch.arange(1 << 21, dtype=torch.float32)
    newest, step = 0, 1
    for _ in range(5):
        pid = os.fork()
        if pid == 0:  # the saver: never returns into pytest
            try:
                while True:
                    save(tmp_path, step, {"big": big, "step": torch.tensor(step)}, good_meta())
                    step += 1
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.05, 0.6))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "killed while saving"
        notes: list[str] = []
        found = latest(tmp_path, notes.append)
        assert notes == [], "the newest ckpt-* is always whole: no write happens under that name"
        if found is None:
            assert newest == 0, "a complete checkpoint, once there, stays there"
            continue
        loaded = found.tensors()
        assert int(loaded["step"]) == found.step and torch.equal(loaded["big"], big), "whole, its own step's"
        assert found.step >= newest
        newest, step = found.step, found.step + 1
    assert newest > 1, "the saves got somewhere before the kills"


# -- what is refused -----------------------------------------------------------------------------------
def test_good_metadata_passes(tmp_path: Path) -> None:
    for meta in (good_meta("val"), good_meta("train", epoch=2, world_size=2)):
        path = save(tmp_path, 4, tensors(), meta)
        validate(complete_meta(path), path)


BAD = [
    ("version", lambda m: m.update(version=2), "version 2"),
    ("format", lambda m: m.update(format="other"), "format 'other'"),
    ("step", lambda m: m.update(step=0), "step 0"),
    ("step of the name", lambda m: m.update(step=5), "the step of its name"),
    ("epoch", lambda m: m.update(epoch=4), "epoch 4"),
    ("epoch type", lambda m: m.update(epoch="1"), "epoch '1'"),
    ("phase", lambda m: m.update(phase="test"), "phase 'test'"),
    ("workers", lambda m: m.update(workers=-1), "workers -1"),
    ("world size", lambda m: m.update(world_size=0), "world_size 0"),
    ("config", lambda m: m["config"].pop("seed"), "config"),
    ("schedule", lambda m: m.update(schedule={"step": 1, "total": 0}), "schedule"),
    ("csv offset", lambda m: m["csv"].update(offset=True), "csv"),
    ("csv digest", lambda m: m["csv"].update(sha256="zz"), "csv"),
    ("doc", lambda m: m.update(doc=[]), "doc []"),
    ("out", lambda m: m.update(out=""), "out ''"),
    ("trained", lambda m: m.update(trained=[]), "trained []"),
    ("trained stats", lambda m: m["trained"][0][0].update(samples="x"), "trained[0][0]"),
    ("counters", lambda m: m.update(counters={"train": {"bytes_read": -1}}), "counters"),
    ("rng count", lambda m: m.update(rng=[]), "rng []"),
    ("rng state", lambda m: m["rng"][0]["numpy"].__setitem__(1, [1, 2]), "rng[0]"),
    ("loader state at epoch end", lambda m: m.update(loader_state={}), "loader_state {}"),
    ("the epoch's record", lambda m: m["doc"].update(epochs=[]), "doc.epochs []"),
]


@pytest.mark.parametrize(("what", "change", "named"), BAD, ids=[b[0] for b in BAD])
def test_a_bad_value_is_one_line_naming_it(tmp_path: Path, what: str, change: Any, named: str) -> None:
    path = written(tmp_path, 4)
    meta = copy.deepcopy(complete_meta(path))
    change(meta)
    with pytest.raises(FeedrateError) as err:
        validate(meta, path)
    message = str(err.value)
    assert named in message and "\n" not in message and str(path) in message, message


MID_EPOCH_BAD = [
    ("no loader state", lambda m: m.update(loader_state=None), "loader_state None"),
    ("batch 0", lambda m: m.update(batch=0), "batch 0"),
    ("accuracy", lambda m: m.update(accuracy=[1, 2]), "accuracy [1, 2]"),
    ("epoch ranks", lambda m: m.update(epoch_ranks=[]), "epoch_ranks []"),
    (
        "stages",
        lambda m: m["epoch_ranks"][0].update(stages={"wall": {"decode": "x"}}),
        "epoch_ranks[0].stages",
    ),
]


@pytest.mark.parametrize(("what", "change", "named"), MID_EPOCH_BAD, ids=[b[0] for b in MID_EPOCH_BAD])
def test_a_bad_mid_epoch_value_is_one_line_naming_it(
    tmp_path: Path, what: str, change: Any, named: str
) -> None:
    path = written(tmp_path, 4, phase="train")
    meta = copy.deepcopy(complete_meta(path))
    change(meta)
    with pytest.raises(FeedrateError, match="is not accepted") as err:
        validate(meta, path)
    assert named in str(err.value), err.value


def test_a_whole_checkpoint_with_a_bad_value_is_an_error_not_passed_over(tmp_path: Path) -> None:
    written(tmp_path, 2)
    bad = written(tmp_path, 3)
    meta = complete_meta(bad) | {"phase": "later"}
    (bad / META).write_text(json.dumps(meta))
    with pytest.raises(FeedrateError, match="phase 'later' is not accepted"):
        latest(tmp_path)


def test_a_setting_that_may_not_change_names_the_flag_and_both_values() -> None:
    saved = {key: 1 for key in checkpoint.FROZEN.values()} | {"seed": 0, "dataset": "abc"}
    checkpoint.check_unchanged(saved, dict(saved), "ck")
    checkpoint.check_unchanged(saved, {"seed": 0}, "ck")  # only what `now` holds is compared
    with pytest.raises(FeedrateError) as err:
        checkpoint.check_unchanged(saved, saved | {"seed": 3}, "ck")
    assert str(err.value) == "--resume: --seed may not change on resume; checkpoint ck has seed 0, this run 3"
    with pytest.raises(
        FeedrateError, match="--data may not change on resume; checkpoint ck has dataset 'abc'"
    ):
        checkpoint.check_unchanged(saved, {"dataset": "def"}, "ck")


MARK = "pwned-by-checkpoint"


class Payload:
    """Unpickling this runs a command: what weights_only=True must refuse."""

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {MARK}",))


def test_a_tensor_file_that_would_run_code_is_refused_unrun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = save(tmp_path / "ck", 1, {"stepper": Payload()}, good_meta())
    found = latest(tmp_path / "ck")
    assert found is not None and found.path == path, "whole: its sha256 is the one meta.json names"
    with pytest.raises(FeedrateError, match="is not a tensor file"):
        found.tensors()
    assert not (tmp_path / MARK).exists(), "nothing ran"


# -- what a resume puts back ---------------------------------------------------------------------------
def test_the_generators_come_back_as_they_were() -> None:
    host, torch_state = checkpoint.host_rng(), checkpoint.torch_rng(torch.device("cpu"))
    json.dumps(host)  # JSON-able as it is
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    checkpoint.restore_rng(json.loads(json.dumps(host)), torch_state, torch.device("cpu"))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws
    with pytest.raises(FeedrateError, match="RNG state"):
        checkpoint.restore_rng(host, {"cpu": torch.zeros(3)}, torch.device("cpu"))


@pytest.mark.parametrize(
    ("saved", "total", "want"),
    [((40, 120), 120, 40), ((40, 120), 60, 20), ((41, 120), 60, 21), ((7, 9), 90, 70)],
)
def test_the_schedule_continues_at_the_same_fraction(saved: tuple[int, int], total: int, want: int) -> None:
    assert checkpoint.schedule_step(*saved, total) == want


def batch(index: int) -> BatchTime:
    return BatchTime(index, 10, 0.01, 0.02, 0.01 * index, 0.03 * index)


def test_the_csv_continues_from_its_checkpoint_cutting_what_came_after(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    stats = EpochStats(**{k: v for k, v in STATS.items()})
    with CsvLog(path) as log:
        log.download("train", 1.0, 0.5, 0.6, 100)
        log.batch(1, 2.0, batch(1), 3)
        offset, digest = log.mark()
        assert path.stat().st_size == offset, "every row logged is on disk"
        log.batch(1, 2.0, batch(2), 3)
        log.epoch(0, 1, stats, 0.5, 0.9)
    whole = path.read_bytes()
    assert hashlib.sha256(whole[:offset]).hexdigest() == digest
    with pytest.raises(FeedrateError, match="changed since its checkpoint"):
        CsvLog(path, (offset, "0" * 64))
    with pytest.raises(FeedrateError, match="its checkpoint recorded"):
        CsvLog(path, (len(whole) + 10, digest))
    assert path.read_bytes() == whole, "a refused resume leaves the file as it was"
    with CsvLog(path, (offset, digest)) as log:
        assert log.cut_rows == 1, "one batch row after the checkpoint"
        log.batch(1, 2.0, batch(2), 3)
        assert log.mark() == (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(CSV_HEADER) and [line.split(",")[0] for line in lines[1:]] == ["10", "2", "2"]
    assert [line.split(",")[5] for line in lines[2:]] == ["1", "2"], "no duplicate, none lost"


def stepper(first_step: int = 0) -> Stepper:
    torch.manual_seed(0)
    return Stepper(
        "small", 10, torch.device("cpu"), lr=0.4, batch_size=8, total_steps=10, first_step=first_step
    )


def steps(s: Stepper, seeds: range) -> None:
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        s.train_step(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g))


def test_a_stepper_continues_exactly_from_its_state() -> None:
    whole = stepper()
    steps(whole, range(6))
    first = stepper()
    steps(first, range(3))
    state = copy.deepcopy(first.state_dict())
    assert set(state) == {"model", "optimizer", "scaler"}, "the schedule's step is meta.json's alone"
    again = stepper(first_step=3)
    again.load_state_dict(state)
    assert again.optimizer.param_groups[0]["lr"] == first.optimizer.param_groups[0]["lr"]
    steps(again, range(3, 6))
    for name, value in whole.module.state_dict().items():
        assert torch.equal(value, again.module.state_dict()[name]), name
    assert again.schedule_step == 6


def test_a_state_that_does_not_fit_the_model_is_one_line() -> None:
    s = stepper()
    state = s.state_dict()
    state["model"] = {"weight": torch.zeros(2)}
    with pytest.raises(FeedrateError, match="does not fit this model"):
        s.load_state_dict(state)
    with pytest.raises(FeedrateError, match="no model, optimizer, scaler state"):
        s.load_state_dict({})


def test_a_state_saved_without_fp16_loads_into_an_fp16_scaler() -> None:
    """A CPU (or bf16, or --no-amp) run saves a disabled scaler's empty state; resuming it on an fp16 GPU
    (--device may change) starts that scaler as a fresh run does. An enabled CPU scaler stands in for
    the GPU's here: it refuses an empty state just as a CUDA one does."""
    saved = stepper()
    steps(saved, range(2))
    state = copy.deepcopy(saved.state_dict())
    assert state["scaler"] == {}
    resumed = stepper(first_step=2)
    resumed.scaler = torch.amp.GradScaler("cpu", enabled=True)
    resumed.load_state_dict(state)
    assert resumed.scaler.get_scale() == torch.amp.GradScaler("cpu").get_scale()
    for name, value in saved.module.state_dict().items():
        assert torch.equal(value, resumed.module.state_dict()[name]), name
