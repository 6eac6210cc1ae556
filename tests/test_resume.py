"""Checkpoints and resume, end to end: train.py killed with SIGKILL (the whole process tree, as a lost node
or a spot preemption leaves it), then relaunched with --resume.

The data say which sample each image is (tests/encoded.py) and FEEDRATE_TRACE_SAMPLES records what every
rank trained on, batch by batch (each process of a run writes its own trace file here). The checkpoint a
resume takes is the newest complete one (read here before the relaunch); its `batch` says how many of the
interrupted epoch's batches it holds, so in the killed run's trace the first `batch` training lines of that
epoch (per rank) are kept and the rest -- trained after the checkpoint, before the kill -- are discarded.
Over the interrupted epoch the kept lines and the resumed run's must be the split exactly once; with the
same worker and rank counts the resumed run's lines must be an uninterrupted run's from the same point,
and (for loaders whose augmentation is a function of the sample: all but the torchvision baseline) the
final model and optimiser state bit for bit the same.

Kill points are random, seeded per test (reproducible), between a quarter and a half into the epoch,
which leaves some slack for the batches the process trains between the test's look at the trace and the
kill.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from test_train import check_csv

from loaders import BACKENDS
from loaders.base import CIFAR10_MEAN, CIFAR10_STD
from rig import locals3
from shardgen import ShardgenConfig, build
from tests.helpers import needs_dali
from training import checkpoint
from training.results import library_versions
from training.trace import TRACE_ENV

REPO = Path(__file__).resolve().parents[1]
TRAIN, TEST, BATCH = 600, 60, 10
BATCHES = TRAIN // BATCH  # per epoch, one rank
EVERY = 4  # --checkpoint-every
EMULATE = "2000"  # img/s: 5 ms a batch, no model to compute (where the model state is not compared)
LOADERS = ["tensor", "torchvision", "wds", pytest.param("dali", marks=needs_dali)]
EXACT_AUGMENT = {"tensor", "wds", "dali"}  # a sample's crop and flip are its own: models compare exactly


def model_flags(loader: str) -> tuple[str, ...]:
    """The same-counts test computes with the model only where the model states are compared; the
    torchvision baseline's augmentation is per worker, so its model is emulated (its order is compared)."""
    return () if loader in EXACT_AUGMENT else ("--emulate", EMULATE)


# -- data, processes, traces -----------------------------------------------------------------------------
def encoded_source(base: Path, train: int = TRAIN) -> Path:
    from encoded import encoded_images

    from feedrate.cifar import CLASS_NAMES, write_batch_dir

    splits = {"train": encoded_images(train), "test": encoded_images(TEST, offset=10_000)}
    write_batch_dir(base / "src" / "cifar-10-batches-py", splits, CLASS_NAMES, label="encoded")
    return base / "src"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 training and 60 test samples, raw, shards of 100 (six: enough for two wds/DALI workers)."""
    base = tmp_path_factory.mktemp("resume-data")
    build(ShardgenConfig(dest=str(base / "ds"), source=str(encoded_source(base)), fmt="raw", shard_size=100))
    return base / "ds"


def args(data: str | Path, out: Path, ckpt: Path, loader: str, workers: int, *extra: str) -> list[str]:
    cmd = ["--loader", loader, "--data", str(data), "--out", str(out), "--device", "cpu", "--arch", "small"]
    cmd += ["--batch-size", str(BATCH), "--workers", str(workers), "--epochs", "2", "--lr", "0.4"]
    return [*cmd, "--checkpoint-dir", str(ckpt), *extra]


def start(
    argv: list[str], trace: Path, nproc: int | None = None, env: dict | None = None
) -> subprocess.Popen:
    """train.py (under torchrun when `nproc` is given), tracing into `trace`.rank<R>."""
    if nproc is None:
        cmd = [sys.executable, str(REPO / "train.py")]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        cmd.append(str(REPO / "train.py"))
    full = {**os.environ, "PYTHONPATH": str(REPO), "CI": "1", "OMP_NUM_THREADS": "1", TRACE_ENV: str(trace)}
    return subprocess.Popen(
        [*cmd, *argv], env=full | (env or {}), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen, timeout: float = 180) -> str:
    """Wait for a run that must complete; its stdout."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise
    assert proc.returncode == 0, f"train.py failed (exit {proc.returncode}):\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    return stdout


def descendants(pid: int) -> list[int]:
    found = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split():
                found += descendants(int(child))
    except (FileNotFoundError, ProcessLookupError):
        pass
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the process and everything it started (torchrun's ranks run in sessions of their own, so
    a process-group kill would miss them), all at once: nothing gets to clean up."""
    for pid in descendants(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)


def trained_lines(trace: Path) -> int:
    try:
        return trace.read_text().count('"split": "train"')
    except FileNotFoundError:
        return 0


def kill_when(proc: subprocess.Popen, ready: Any, what: str, timeout: float = 180) -> None:
    """SIGKILL the run (its whole tree) as soon as `ready()` holds."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                kill_tree(proc)
            _, stderr = proc.communicate()
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}: {stderr[-3000:]}")
        time.sleep(0.002)
    kill_tree(proc)
    assert proc.returncode == -signal.SIGKILL


def kill_at(proc: subprocess.Popen, trace: Path, ckpt: Path, line: int) -> checkpoint.Checkpoint:
    """Kill the run once rank 0 has begun its `line`-th training batch and a checkpoint exists; the
    checkpoint a resume will take."""
    rank0 = Path(f"{trace}.rank0")
    kill_when(proc, lambda: trained_lines(rank0) >= line and checkpoint.checkpoints(ckpt), f"batch {line}")
    found = checkpoint.latest(ckpt)
    assert found is not None
    return found


def read_trace(prefix: Path) -> list[dict]:
    """Every rank's trace lines (rank order, then batch order)."""
    lines = []
    for path in sorted(prefix.parent.glob(f"{prefix.name}.rank*")):
        lines += [json.loads(line) for line in path.read_text().splitlines()]
    return lines


def ids(lines: list[dict]) -> list[int]:
    """The sample indices the traced batches held, in order (and each label checked against its index)."""
    out = []
    for line in lines:
        centre = torch.tensor(line["centre"])
        values = torch.round((centre * torch.tensor(CIFAR10_STD) + torch.tensor(CIFAR10_MEAN)) * 255).long()
        index = (values[:, 0] + 256 * values[:, 1]).tolist()
        assert [(i * 7 + 3) % 10 for i in index] == line["labels"], "images and labels travel together"
        out += index
    return out


def of(lines: list[dict], epoch: int, rank: int | None = None, split: str = "train") -> list[dict]:
    return [
        x
        for x in lines
        if x["split"] == split and x["epoch"] == epoch and (rank is None or x["rank"] == rank)
    ]


def split_at(killed: list[dict], ranks: int, epoch: int, batch: int) -> tuple[list[dict], list[dict]]:
    """The killed run's lines of `epoch` kept by its checkpoint (each rank's first `batch`) and those
    discarded (trained after the checkpoint, before the kill)."""
    kept, discarded = [], []
    for rank in range(ranks):
        mine = of(killed, epoch, rank)
        kept += mine[:batch]
        discarded += mine[batch:]
    return kept, discarded


def assert_once(samples: list[int], total: int = TRAIN) -> None:
    counts = Counter(samples)
    repeated = sorted(i for i, n in counts.items() if n > 1)
    missing = sorted(set(range(total)) - set(counts))
    assert not repeated and not missing and len(counts) == total, (
        f"not the split exactly once: repeated {repeated[:10]}, missing {missing[:10]}, foreign "
        f"{sorted(set(counts) - set(range(total)))[:10]}"
    )


def require_state(loader: str) -> None:
    """A loader without the state contract yet fails here, clearly, rather than somewhere in train.py."""
    module_name, class_name, _ = BACKENDS[loader]
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (hasattr(cls, "state_dict") and hasattr(cls, "load_state_dict")):
        pytest.fail(f"the {loader} loader has no state_dict()/load_state_dict() yet (loaders.resume)")


def csv_rows(path: Path) -> list[list[str]]:
    return [line.split(",") for line in path.read_text().splitlines()[1:]]


def final_tensors(ckpt: Path) -> dict[str, Any]:
    found = checkpoint.latest(ckpt)
    assert found is not None and found.meta["epoch"] == 2 and found.meta["phase"] == "val"
    return found.tensors()["stepper"]


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), f"model {name} differs"
    for key, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"]), key
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]


@pytest.fixture(scope="module")
def reference(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """An uninterrupted run per loader (checkpoints at epoch ends only): (trace lines, run dir, its
    final training state). Made once per module and loader."""
    made: dict[str, tuple[list[dict], Path, dict[str, Any]]] = {}

    def get(loader: str, workers: int) -> tuple[list[dict], Path, dict[str, Any]]:
        if loader not in made:
            base = tmp_path_factory.mktemp(f"reference-{loader}")
            trace = base / "trace"
            argv = args(dataset, base / "run", base / "ck", loader, workers, *model_flags(loader))
            finish(start(argv, trace))
            made[loader] = (read_trace(trace), base / "run", final_tensors(base / "ck"))
        return made[loader]

    return get


# -- the tests -------------------------------------------------------------------------------------------
WORKERS = {"tensor": 0, "torchvision": 0, "wds": 2, "dali": 2}  # as each is fastest to start here


@pytest.mark.parametrize("loader", LOADERS)
def test_a_run_killed_mid_epoch_resumes_where_its_checkpoint_was(
    loader: str, dataset: Path, reference: Any, tmp_path: Path
) -> None:
    require_state(loader)
    workers = WORKERS[loader]
    rng = random.Random(f"same counts {loader}")
    line = BATCHES + rng.randrange(BATCHES // 4, BATCHES // 2)  # in epoch 2
    out, ckpt = tmp_path / "run", tmp_path / "ck"
    argv = args(dataset, out, ckpt, loader, workers, "--checkpoint-every", str(EVERY), *model_flags(loader))
    found = kill_at(start(argv, tmp_path / "killed"), tmp_path / "killed", ckpt, line)
    epoch, batch = found.meta["epoch"], found.meta["batch"]
    assert (epoch, found.meta["phase"]) == (2, "train") and batch % EVERY == 0, found.meta
    began = time.monotonic()
    stdout = finish(start([*argv, "--resume"], tmp_path / "resumed"))
    wall = time.monotonic() - began
    assert (
        f"resuming from {found.path} (epoch 2, {batch} batches done, train; step {BATCHES + batch})" in stdout
    )

    killed, resumed = read_trace(tmp_path / "killed"), read_trace(tmp_path / "resumed")
    kept, discarded = split_at(killed, 1, epoch, batch)
    after = of(resumed, epoch)
    assert of(resumed, 1) == [] and of(resumed, 1, split="test") == [], "nothing before the checkpoint again"
    assert_once(ids(kept) + ids(after))
    assert set(ids(discarded)) <= set(ids(after)), "what came after the checkpoint is trained again"

    ref_lines, ref_out, ref_state = reference(loader, workers)
    assert kept == of(ref_lines, epoch)[:batch], "the killed run was the uninterrupted one up to its kill"
    assert after == of(ref_lines, epoch)[batch:], "and the resumed run goes on exactly as it would have"
    assert of(resumed, 2, split="test") == of(ref_lines, 2, split="test")
    if loader in EXACT_AUGMENT:
        assert_same_state(final_tensors(ckpt), ref_state)

    # the CSV: the uninterrupted run's rows, once each (times aside); type 0/1 rows carry the same accuracy
    epoch_rows = check_csv(out / "train.csv", epochs=2, planned=BATCHES)
    ref_rows = [r for r in csv_rows(ref_out / "train.csv") if r[0] in ("0", "1")]
    assert [r[:2] for r in epoch_rows] == [r[:2] for r in ref_rows]
    if loader in EXACT_AUGMENT:
        assert [r[5:] for r in epoch_rows] == [r[5:] for r in ref_rows]

    doc = json.loads((out / "run.json").read_text())
    assert doc["status"] == "complete" and len(doc["epochs"]) == 2
    (note,) = doc["resumed"]
    assert note["checkpoint"] == {
        "name": found.path.name,
        "step": BATCHES + batch,
        "epoch": 2,
        "batch": batch,
        "phase": "train",
    }
    assert note["workers"] == {"old": workers, "new": workers} and note["world_size"] == {"old": 1, "new": 1}
    assert all(note[key] > 0 for key in ("find_s", "load_s", "first_batch_s"))
    assert note["resume_s"] < wall, "checkpoint load to first batch is part of the resumed process's life"
    # the resumed process describes itself (run.json's top level is the first process's)
    assert note["device"]["type"] == "cpu" and note["versions"] == library_versions()
    assert set(note["git"]) == {"commit", "dirty"} and note["machine"]["cpu_count"] >= 1
    assert note["distributed"] is None and note["downloads"] == []
    record = doc["epochs"][1]["train"]
    assert (record["batches"], record["samples"]) == (BATCHES, TRAIN)
    assert [(p["first_batch"], p["batches"]) for p in record["parts"]] == [
        (1, batch),
        (batch + 1, BATCHES - batch),
    ]
    assert "parts" not in doc["epochs"][0]["train"]


OTHER_WORKERS = [
    ("tensor", 0, 2, "s3"),  # downloads its split up front: rows 10/11 once, the resume's in run.json
    ("torchvision", 0, 1, "local"),
    ("wds", 1, 2, "local"),
    ("wds", 2, 1, "s3"),
    pytest.param("dali", 1, 2, "local", marks=needs_dali),
]


@pytest.mark.parametrize(("loader", "before", "after", "storage"), OTHER_WORKERS)
def test_a_run_resumed_with_other_workers_trains_the_rest_of_its_epoch_once(
    loader: str, before: int, after: int, storage: str, dataset: Path, tmp_path: Path, request: Any
) -> None:
    require_state(loader)
    data: str | Path = dataset
    env: dict[str, str] = {}
    if storage == "s3":
        server: locals3.LocalS3 = request.getfixturevalue("s3_env")
        bucket = request.getfixturevalue("bucket")
        data = f"s3://{bucket}/ds"
        build(ShardgenConfig(dest=data, source=str(encoded_source(tmp_path)), fmt="raw", shard_size=100))
        env = server.env()
    rng = random.Random(f"other workers {loader} {storage}")
    line = rng.randrange(BATCHES // 4, BATCHES // 2)  # in epoch 1
    out, ckpt = tmp_path / "run", tmp_path / "ck"
    common = ("--checkpoint-every", str(EVERY), "--emulate", EMULATE)
    found = kill_at(
        start(args(data, out, ckpt, loader, before, *common), tmp_path / "killed", env=env),
        tmp_path / "killed",
        ckpt,
        line,
    )
    epoch, batch = found.meta["epoch"], found.meta["batch"]
    assert (epoch, found.meta["phase"], found.meta["workers"]) == (1, "train", before), found.meta
    finish(start(args(data, out, ckpt, loader, after, *common, "--resume"), tmp_path / "resumed", env=env))
    kept, _ = split_at(read_trace(tmp_path / "killed"), 1, epoch, batch)
    resumed = read_trace(tmp_path / "resumed")
    assert_once(ids(kept) + ids(of(resumed, 1)))
    assert_once(ids(of(resumed, 2)))
    assert sorted(ids(of(resumed, 2, split="test"))) == list(range(10_000, 10_000 + TEST))
    doc = json.loads((out / "run.json").read_text())
    fetched = {"train": TRAIN, "test": TEST} if doc["downloads"] else {}
    assert bool(fetched) == (storage == "s3" and loader != "wds"), "loaders that copy a remote split"
    # the first process's download rows once, at the top (the resumed process's are in its entry)
    check_csv(
        out / "train.csv", epochs=2, planned=BATCHES, downloads={10: TRAIN, 11: TEST} if fetched else {}
    )
    note = doc["resumed"][0]
    assert {d["split"]: d["samples"] for d in doc["downloads"]} == fetched
    assert {d["split"]: d["samples"] for d in note["downloads"]} == fetched
    assert note["workers"] == {"old": before, "new": after}
    assert doc["epochs"][0]["train"]["samples"] == TRAIN


TORCHRUN = [
    ("tensor", 2, 1),
    pytest.param("torchvision", 1, 2, marks=pytest.mark.slow),
    pytest.param("wds", 2, 1, marks=pytest.mark.slow),
    pytest.param("dali", 2, 1, marks=[pytest.mark.slow, needs_dali]),
]


@pytest.mark.parametrize(("loader", "before", "after"), TORCHRUN)
def test_torchrun_resumed_with_another_nproc_per_node_trains_the_rest_once(
    loader: str, before: int, after: int, dataset: Path, tmp_path: Path
) -> None:
    require_state(loader)
    line = random.Random(f"torchrun {loader}").randrange(BATCHES // before // 4, BATCHES // before // 2)
    out, ckpt = tmp_path / "run", tmp_path / "ck"
    argv = args(dataset, out, ckpt, loader, 1 if loader in ("wds", "dali") else 0)
    argv += ["--checkpoint-every", str(EVERY), "--emulate", EMULATE]
    found = kill_at(start(argv, tmp_path / "killed", nproc=before), tmp_path / "killed", ckpt, line)
    epoch, batch = found.meta["epoch"], found.meta["batch"]
    assert (epoch, found.meta["phase"], found.meta["world_size"]) == (1, "train", before), found.meta
    finish(start([*argv, "--resume"], tmp_path / "resumed", nproc=after))
    kept, _ = split_at(read_trace(tmp_path / "killed"), before, epoch, batch)
    resumed = read_trace(tmp_path / "resumed")
    assert {x["rank"] for x in resumed} == set(range(after))
    assert_once(ids(kept) + ids(of(resumed, 1)))
    assert_once(ids(of(resumed, 2)))
    doc = json.loads((out / "run.json").read_text())
    note = doc["resumed"][0]
    assert note["world_size"] == {"old": before, "new": after}
    assert note["resumed_epoch"]["samples"] == TRAIN - before * batch * BATCH
    parts = doc["epochs"][0]["train"]["parts"]
    assert [(p["world_size"], p["samples"]) for p in parts] == [
        (before, before * batch * BATCH),
        (after, TRAIN - before * batch * BATCH),
    ]


ODD = 201  # training samples: 21 batches of 10 on one rank, the last of one sample


@pytest.fixture(scope="module")
def odd_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """201 training samples (= 20 x 10 + 1): a one-rank checkpoint after 4k batches leaves 201 - 40k =
    20m + 1, which two ranks take as 10m + 1 and 10m, one batch apart: the equal-steps rule drops one."""
    base = tmp_path_factory.mktemp("odd-data")
    source = encoded_source(base, train=ODD)
    build(ShardgenConfig(dest=str(base / "ds"), source=str(source), fmt="raw", shard_size=100))
    return base / "ds"


def test_torchrun_1_to_2_drops_at_most_one_sample_a_rank_of_the_remainder_and_says_so(
    odd_dataset: Path, tmp_path: Path
) -> None:
    """An elastic resume under DDP is exactly-once but for the equal-steps drop (training.distributed):
    what no rank trained is exactly what run.json says was dropped, and nothing is trained twice."""
    line = random.Random("odd remainder").randrange(5, 9)  # the checkpoint after batch 4 or 8 of 21
    out, ckpt = tmp_path / "run", tmp_path / "ck"
    argv = args(odd_dataset, out, ckpt, "tensor", 0, "--checkpoint-every", str(EVERY), "--emulate", "500")
    found = kill_at(start(argv, tmp_path / "killed"), tmp_path / "killed", ckpt, line)
    batch = found.meta["batch"]
    assert (found.meta["epoch"], found.meta["phase"], found.meta["world_size"]) == (1, "train", 1)
    finish(start([*argv, "--resume"], tmp_path / "resumed", nproc=2))
    kept, _ = split_at(read_trace(tmp_path / "killed"), 1, 1, batch)
    resumed = read_trace(tmp_path / "resumed")
    trained = ids(kept) + ids(of(resumed, 1))
    assert len(trained) == len(set(trained)), "nothing trained twice"
    missing = set(range(ODD)) - set(trained)
    doc = json.loads((out / "run.json").read_text())
    (note,) = doc["resumed"]
    rest = ODD - batch * BATCH
    assert note["resumed_epoch"]["rank_samples"] == [(rest + 1) // 2, rest // 2]
    assert len(missing) == note["resumed_epoch"]["dropped"] == 1, "the drop is the one sample missing"
    assert doc["epochs"][0]["train"]["parts"][-1]["dropped"] == 1
    assert doc["epochs"][0]["train"]["samples"] == ODD - 1
    # the first process ran alone (no `distributed` at the top); the resumed one says how it shared out
    assert doc["distributed"] is None and note["distributed"]["world_size"] == 2
    whole = note["distributed"]["splits"]["train"]
    assert whole["rank_samples"] == [101, 100] and whole["dropped"] == 1
    epoch2 = ids(of(resumed, 2))
    assert len(epoch2) == len(set(epoch2)) == ODD - whole["dropped"]


def test_a_save_killed_before_its_rename_is_never_resumed_from(dataset: Path, tmp_path: Path) -> None:
    out, ckpt = tmp_path / "run", tmp_path / "ck"
    argv = args(dataset, out, ckpt, "tensor", 0, "--checkpoint-every", str(EVERY), "--emulate", EMULATE)
    cut_step = 3 * EVERY  # the third save pauses, its files written, before its rename (the test seam)
    proc = start(argv, tmp_path / "killed", env={checkpoint.PAUSE_ENV: f"120@{cut_step}"})
    kill_when(proc, lambda: list(ckpt.glob(f".tmp-{cut_step:012d}-*/{checkpoint.META}")), "the third save")
    (cut,) = ckpt.glob(".tmp-*")
    assert (cut / checkpoint.TENSORS).is_file() and [p.name for p in checkpoint.checkpoints(ckpt)] == [
        checkpoint.checkpoint_name(2 * EVERY),
        checkpoint.checkpoint_name(EVERY),
    ]
    finish(start([*argv, "--resume"], tmp_path / "resumed"))
    doc = json.loads((out / "run.json").read_text())
    assert doc["resumed"][0]["checkpoint"]["step"] == 2 * EVERY, (
        "the last complete checkpoint, not the cut one"
    )
    kept, _ = split_at(read_trace(tmp_path / "killed"), 1, 1, 2 * EVERY)
    assert_once(ids(kept) + ids(of(read_trace(tmp_path / "resumed"), 1)))
    assert not list(ckpt.glob(".tmp-*")), "the cut save is cleared by the next one"


def test_a_run_killed_during_validation_resumes_at_that_validation(dataset: Path, tmp_path: Path) -> None:
    out, ckpt = tmp_path / "run", tmp_path / "ck"
    argv = args(dataset, out, ckpt, "tensor", 0, "--emulate", "1000")  # epoch-end checkpoints only
    proc = start(argv, tmp_path / "killed")
    rank0 = tmp_path / "killed.rank0"
    kill_when(proc, lambda: rank0.exists() and '"split": "test"' in rank0.read_text(), "validation")
    found = checkpoint.latest(ckpt)
    assert (found.meta["epoch"], found.meta["phase"], found.meta["batch"]) == (1, "val", BATCHES)
    finish(start([*argv, "--resume"], tmp_path / "resumed"))
    resumed = read_trace(tmp_path / "resumed")
    assert of(resumed, 1) == [], "epoch 1's training is not repeated"
    assert sorted(ids(of(resumed, 1, split="test"))) == list(range(10_000, 10_000 + TEST))
    assert_once(ids(of(resumed, 2)))
    check_csv(out / "train.csv", epochs=2, planned=BATCHES)  # one validation row per epoch, in place
    doc = json.loads((out / "run.json").read_text())
    assert doc["status"] == "complete" and doc["epochs"][0]["val"]["samples"] == TEST
    assert doc["resumed"][0]["checkpoint"]["phase"] == "val"


# -- the command line ------------------------------------------------------------------------------------
def main(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    import train

    try:
        code = train.main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_resume_on_an_empty_directory_starts_afresh_and_later_refusals_name_the_value(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out, ckpt = tmp_path / "run", tmp_path / "ck"
    quick = args(dataset, out, ckpt, "tensor", 0, "--emulate", "1e6", "--max-batches", "3", "--epochs", "1")
    # a run killed before its first checkpoint left its results: the same command starts them over
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"config": {"checkpoint_dir": str(ckpt)}}))
    (out / "train.csv").write_text("from a run killed before its first checkpoint\n")
    code, stdout, _ = main(capsys, [*quick, "--resume"])
    assert code == 0 and f"no checkpoint in {ckpt}; starting afresh" in stdout
    assert [p.name for p in checkpoint.checkpoints(ckpt)] == [checkpoint.checkpoint_name(3)]

    code, _, err = main(capsys, quick)
    assert code == 2 and err.strip() == (
        f"train.py: error: --checkpoint-dir {ckpt} holds checkpoints of an earlier run; pass --resume to "
        "continue it, or choose an empty directory"
    )
    where = ckpt / checkpoint.checkpoint_name(3)
    for flag, value, key, old in (("--seed", "4", "seed", 0), ("--batch-size", "5", "batch_size", 10)):
        code, _, err = main(capsys, [*quick, "--resume", flag, value])
        assert code == 2 and err.strip() == (
            f"train.py: error: --resume: {flag} may not change on resume; checkpoint {where} has {key} "
            f"{old!r}, this run {int(value)!r}"
        )
    code, _, err = main(capsys, [*quick, "--resume", "--out", str(tmp_path / "elsewhere")])
    assert (
        code == 2
        and "continues in its checkpoint's output directory" in err
        and not (tmp_path / "elsewhere").exists()
    )
    other = tmp_path / "other"
    build(
        ShardgenConfig(
            dest=str(other),
            source="synthetic",
            fmt="raw",
            synthetic_train=20,
            synthetic_test=10,
            allow_download=False,
        )
    )
    code, _, err = main(capsys, [*quick, "--resume", "--data", str(other)])
    assert code == 2 and "--data may not change on resume" in err
    code, _, err = main(capsys, [*quick[:-2], "--resume"])  # --epochs 2 now
    assert code == 2 and "--epochs may not change" in err
    for bad, message in (
        (["--resume"], "--resume needs --checkpoint-dir DIR"),
        (["--checkpoint-every", "0", "--checkpoint-dir", str(ckpt)], "--checkpoint-every 0 must be >= 1"),
    ):
        code, _, err = main(capsys, ["--data", str(dataset), *bad])
        assert code == 2 and err.strip() == f"train.py: error: {message}"
    # a checkpoint directory moved (or handed in): its meta.json's output path is not taken on trust
    moved = tmp_path / "moved"
    shutil.copytree(ckpt, moved)
    without_out = [*quick[:4], *quick[6:]]
    assert without_out[:4] == ["--loader", "tensor", "--data", str(dataset)] and "--out" not in without_out
    before = (out / "train.csv").read_bytes(), (out / "run.json").read_bytes()
    code, _, err = main(capsys, [*without_out, "--resume", "--checkpoint-dir", str(moved)])
    assert code == 2 and err.strip() == (
        f"train.py: error: --resume: the checkpoint's output directory {out.resolve()} holds no run.json "
        f"naming --checkpoint-dir {moved}; pass --out {out.resolve()} to continue the run there"
    )
    assert ((out / "train.csv").read_bytes(), (out / "run.json").read_bytes()) == before
    code, _, _ = main(capsys, [*without_out, "--resume"])  # its own DIR: no --out needed
    assert code == 0
    # what the refused resumes left: the run as it was (the last one resumed at the end: nothing to do)
    check_csv(out / "train.csv", epochs=1, planned=3)
