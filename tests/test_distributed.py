"""Distributed training: torchrun's environment, the epoch plan, and real 2-process runs (gloo, CPU).

The runs use a dataset whose every image encodes its sample index (tests/encoded.py) and train.py's
FEEDRATE_TRACE_SAMPLES aid, so the test sees which samples each rank trained and evaluated on. 301
training and 101 test samples in shards of 100 with batches of 50 make every loader's parts uneven: the
torchvision loader pads one repeat, the tensor and DALI loaders leave one rank a batch short (one sample
dropped), and the WebDataset loader, which deals whole shards to ranks, leaves 50 samples out.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from test_train import TIME, check_csv

import train
from feedrate.errors import FeedrateError
from loaders import LoaderConfig, make_loader
from loaders.base import CIFAR10_MEAN, CIFAR10_STD
from tests.helpers import needs_dali
from training.distributed import Group, Topology, plan_split
from training.timing import EpochStats, across_ranks, combine, combine_ranks
from training.trace import TRACE_ENV

REPO = Path(__file__).resolve().parents[1]
TRAIN, TEST, BATCH = 301, 101, 50


# -- torchrun's environment --------------------------------------------------------------------------
def test_topology_reads_torchruns_environment() -> None:
    assert Topology.from_env({}) == Topology(0, 1, 0, 1) and not Topology().distributed
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    env |= {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    topology = Topology.from_env(env)
    assert topology == Topology(3, 4, 1, 2) and topology.distributed and not topology.is_main
    # Without LOCAL_WORLD_SIZE every process is taken to share this node's cores.
    assert Topology.from_env({k: v for k, v in env.items() if k != "LOCAL_WORLD_SIZE"}).local_world_size == 4


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer; launch with torchrun"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be >= 1"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2 must be in 0..1 (WORLD_SIZE)"),
        ({"LOCAL_RANK": "1"}, "LOCAL_RANK=1 must be in 0..0 (LOCAL_WORLD_SIZE)"),
        ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, "MASTER_ADDR and MASTER_PORT unset"),
    ],
)
def test_a_bad_environment_names_the_variable_and_what_is_accepted(env: dict, message: str) -> None:
    with pytest.raises(FeedrateError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Topology.from_env(env)


def test_a_single_process_never_starts_a_process_group(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    group = Group.start(Topology(), torch.device("cpu"))
    assert not group.distributed and group.gather("x") == ["x"] and group.world_size == 1
    assert torch.equal(group.all_sum(torch.tensor([1, 2])), torch.tensor([1, 2]))

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("init_process_group called in a single-process run")

    monkeypatch.setattr(torch.distributed, "init_process_group", refuse)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    out = tmp_path / "single"
    args = ["--data", str(tiny_dataset), "--out", str(out), "--device", "cpu", "--arch", "small"]
    assert train.main([*args, "--workers", "0", "--batch-size", "100", "--max-batches", "2"]) == 0
    doc = json.loads((out / "run.json").read_text())
    assert doc["distributed"] is None and "ranks" not in doc["epochs"][0]["train"]


# -- the plan ---------------------------------------------------------------------------------------
def test_training_runs_the_fewest_batches_and_counts_what_that_drops() -> None:
    # the tensor loader's parts of 301 samples: 151 and 150, batches of 50 -> 4 and 3 batches
    plan = plan_split(301, [(151, 4), (150, 3)], 50, equal_steps=True)
    assert plan.batches == (3, 3) and plan.dropped == 1 and plan.padded == 0
    # DistributedSampler: 151 each, one repeat
    plan = plan_split(301, [(151, 4), (151, 4)], 50, equal_steps=True)
    assert plan.batches == (4, 4) and plan.dropped == 0 and plan.padded == 1
    # whole shards per rank: 200 and 101
    plan = plan_split(301, [(200, 4), (101, 3)], 50, equal_steps=True)
    assert plan.batches == (3, 3) and plan.dropped == 50
    # the user's cap is not a drop; validation runs each rank's own batches
    assert plan_split(301, [(151, 4), (150, 3)], 50, equal_steps=True, max_batches=2).dropped == 1
    plan = plan_split(101, [(51, 2), (50, 1)], 50, equal_steps=False, max_batches=5)
    assert plan.batches == (2, 1) and plan.dropped == 0 and plan.as_dict()["rank_samples"] == [51, 50]
    # single process: today's plan
    assert plan_split(600, [(600, 10)], 64, equal_steps=True, max_batches=3).batches == (3,)


def stats(samples: int, duration: float, loading: float, compute: float, batches: int = 4) -> EpochStats:
    return EpochStats(1.0, batches, samples, loading, duration, compute, first_batch=1.0, first_step=0.5)


def test_job_figures_sum_samples_take_the_slowest_wall_and_average_the_fractions() -> None:
    a, b = stats(100, 10.0, 2.0, 7.5), stats(100, 8.0, 4.0, 3.0)
    assert across_ranks([a]) == a.as_dict() and combine_ranks([[a], [b]]) == combine([a, b])
    job = across_ranks([a, b])
    assert job["samples"] == 200 and job["seconds"] == 10.0 and job["img_per_s"] == 20.0
    assert job["data_wait_fraction"] == pytest.approx((0.2 + 0.5) / 2)
    assert job["au"] == pytest.approx((7.0 / 9.0 + 2.5 / 7.0) / 2)
    summary = combine_ranks([[a, b], [a, b]])
    assert summary["img_per_s"] == 20.0 and summary["au"] == pytest.approx(job["au"])


# -- the loaders' parts in-process ------------------------------------------------------------------
def identities(images: torch.Tensor) -> list[int]:
    """Sample indices from normalised NCHW images of tests/encoded.py (or their centre pixels, N x 3)."""
    centre = images[:, :, 16, 16] if images.dim() == 4 else images
    values = torch.round((centre.float() * torch.tensor(CIFAR10_STD) + torch.tensor(CIFAR10_MEAN)) * 255)
    return (values[:, 0] + 256 * values[:, 1]).long().tolist()


def test_the_torchvision_loader_deals_parts_in_turn_without_repeats(make_encoded_dataset) -> None:
    root = str(make_encoded_dataset("raw", n_train=TRAIN, n_test=TEST, shard_size=100))
    seen: dict[str, list[list[int]]] = {"train": [], "test": []}
    for split in seen:
        for rank in (0, 1):
            cfg = LoaderConfig(root, split, BATCH, train=split == "train", rank=rank, world_size=2)
            loader = make_loader("torchvision", cfg)
            loader.set_epoch(1)
            part = [i for images, _ in loader for i in identities(images)]
            assert len(part) == loader.samples
            seen[split].append(part)
    train_part = seen["train"][0] + seen["train"][1]
    assert [len(part) for part in seen["train"]] == [151, 150]  # no padding (loaders.batches.SplitOrder)
    assert sorted(train_part) == list(range(TRAIN))
    assert sorted(seen["test"][0] + seen["test"][1]) == list(range(10_000, 10_000 + TEST))


@needs_dali
def test_dali_ranks_stay_disjoint_when_one_abandons_an_epoch(make_encoded_dataset) -> None:
    """train.py stops every rank at the shortest rank's batch count, so the rank with one batch more
    abandons its epoch; the next epoch must still split one order among the ranks."""
    root = str(make_encoded_dataset("raw", n_train=TRAIN, n_test=TEST, shard_size=100))
    ranks = [
        make_loader("dali", LoaderConfig(root, "train", BATCH, train=True, rank=r, world_size=2))
        for r in (0, 1)
    ]
    assert [len(loader) for loader in ranks] == [3, 4]
    for epoch in (1, 2, 3):
        seen = []
        for loader in ranks:
            loader.set_epoch(epoch)
            batches = iter(loader)
            for _ in range(3):
                seen += identities(next(batches)[0])
            batches.close()
        assert len(set(seen)) == len(seen) == 300, epoch


# -- real torchrun runs -----------------------------------------------------------------------------
def torchrun(*args: str, env: dict[str, str] | None = None, **popen: object) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(REPO / "train.py"), *args]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "CI": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(
        cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )


def quick_args(data: Path, out: Path, loader: str, *extra: str) -> list[str]:
    args = ["--loader", loader, "--data", str(data), "--out", str(out), "--device", "cpu", "--arch", "small"]
    return [*args, "--batch-size", str(BATCH), "--workers", "0", "--lr", "0.8", *extra]


def read_trace(prefix: Path) -> list[dict]:
    lines = []
    for rank in (0, 1):
        path = Path(f"{prefix}.rank{rank}")
        lines += [json.loads(line) for line in path.read_text().splitlines()]
    return lines


LOADERS = [
    "torchvision",
    "tensor",
    pytest.param("dali", marks=needs_dali),
    "wds",
]


@pytest.mark.parametrize("loader", LOADERS)
def test_two_processes_split_every_epoch_and_run_equal_steps(
    loader: str, make_encoded_dataset, tmp_path: Path
) -> None:
    data = make_encoded_dataset("raw", n_train=TRAIN, n_test=TEST, shard_size=100)
    out, trace = tmp_path / "run", tmp_path / "trace"
    proc = torchrun(*quick_args(data, out, loader, "--epochs", "2"), env={TRACE_ENV: str(trace)})
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr
    # rank 0 alone prints and writes
    assert stdout.count("device cpu") == 1 and stdout.count("complete; results in") == 1, stdout
    assert "Traceback" not in stderr and "error" not in stderr.lower(), stderr
    assert sorted(os.listdir(out)) == ["run.json", "train.csv"]
    doc = json.loads((out / "run.json").read_text())
    assert doc["status"] == "complete"
    dist = doc["distributed"]
    assert (dist["world_size"], dist["backend"], dist["global_batch_size"]) == (2, "gloo", 100)
    assert [r["rank"] for r in dist["ranks"]] == [0, 1]
    plans = dist["splits"]
    planned = plans["train"]["rank_batches"]
    assert planned[0] == planned[1] == doc["config"]["planned_batches"]["train"]
    epoch_rows = check_csv(out / "train.csv", epochs=2, planned=planned[0])

    lines = read_trace(trace)
    for epoch in (1, 2):
        # identical training step counts; every rank evaluates its whole part
        steps = Counter(line["rank"] for line in lines if line["split"] == "train" and line["epoch"] == epoch)
        assert steps == {0: planned[0], 1: planned[1]}
        evals = Counter(line["rank"] for line in lines if line["split"] == "test" and line["epoch"] == epoch)
        assert evals == dict(enumerate(plans["test"]["rank_batches"]))
        seen = {}
        for split in ("train", "test"):
            ours = [x for x in lines if x["split"] == split and x["epoch"] == epoch]
            ids = [i for line in ours for i in identities(torch.tensor(line["centre"]))]
            assert [(i * 7 + 3) % 10 for i in ids] == [y for line in ours for y in line["labels"]]
            seen[split] = ids
        # validation: the whole split, each sample once
        assert sorted(seen["test"]) == list(range(10_000, 10_000 + TEST))
        # training: samples of the split only; repeats only as padded, absences only as dropped
        part, counts = plans["train"], Counter(seen["train"])
        assert set(counts) <= set(range(TRAIN))
        assert len(seen["train"]) == sum(min(n, planned[0] * BATCH) for n in part["rank_samples"])
        assert len(seen["train"]) - len(counts) <= part["padded"]
        assert len(counts) >= TRAIN - part["dropped"]
    expected = {"torchvision": (0, 1), "tensor": (0, 1), "dali": (0, 1), "wds": (0, 1)}[loader]
    assert (plans["train"]["padded"], plans["train"]["dropped"]) == expected
    assert (plans["test"]["padded"], plans["test"]["dropped"]) == (0, 0)

    # run.json: the job's figures, every rank's own, accuracy over every rank's samples
    for entry, (tr, va) in zip(
        doc["epochs"], zip(epoch_rows[::2], epoch_rows[1::2], strict=True), strict=True
    ):
        assert [r["batches"] for r in entry["train"]["ranks"]] == planned
        assert entry["train"]["samples"] == len(seen["train"]) and entry["val"]["samples"] == TEST
        for r in entry["train"]["ranks"] + entry["val"]["ranks"]:
            assert r["loading_seconds"] >= 0 and r["compute_seconds"] > 0 and r["img_per_s"] > 0
        assert float(tr[5]) == pytest.approx(entry["train"]["top1"], abs=1e-6)
        assert float(va[5]) == pytest.approx(entry["val"]["top1"], abs=1e-6)
        hits = entry["val"]["top1"] * TEST
        assert hits == pytest.approx(round(hits), abs=1e-6), "top-1 counts hits over the whole split"
    assert doc["counters"]["train"]["bytes_read"] == sum(
        c["train"]["bytes_read"] for c in dist["rank_counters"]
    )


@pytest.mark.slow
def test_a_failure_on_one_rank_stops_every_rank_with_one_error_line(
    make_encoded_dataset, tmp_path: Path
) -> None:
    """Only rank 0 checks --out; the other rank must neither hang waiting for it nor print the error too."""
    data = make_encoded_dataset("raw", n_train=TRAIN, n_test=TEST, shard_size=100)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "train.csv").write_text("earlier results\n")
    proc = torchrun(*quick_args(data, out, "tensor"))
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    errors = [line for line in stderr.splitlines() if line.startswith("train.py: error:")]
    assert errors == [
        f"train.py: error: --out {out} already exists; pass --overwrite or choose another directory"
    ]
    assert (out / "train.csv").read_text() == "earlier results\n" and os.listdir(out) == ["train.csv"]


@pytest.mark.parametrize(
    "sig",
    [
        pytest.param(signal.SIGINT, id="SIGINT"),
        pytest.param(signal.SIGTERM, id="SIGTERM", marks=pytest.mark.slow),
    ],
)
def test_a_signal_to_torchrun_leaves_a_complete_csv_and_an_interrupted_run_json(
    sig: signal.Signals, make_encoded_dataset, tmp_path: Path
) -> None:
    data = make_encoded_dataset("raw", n_train=TRAIN, n_test=TEST, shard_size=100)
    out = tmp_path / "stopped"
    # DataLoader workers too: torchrun signals each rank's whole process group. 40 epochs (a minute or
    # two) outlast the wait below, and bound a run that the test fails to stop.
    args = quick_args(data, out, "torchvision", "--epochs", "40", "--batch-size", "20", "--workers", "1")
    proc = torchrun(*args)
    csv, deadline = out / "train.csv", time.monotonic() + 180

    def started() -> bool:  # in the third epoch: one epoch row, twenty batch rows
        text = csv.read_text() if csv.exists() else ""
        return text.count("\n0,") >= 1 and text.count("\n2,") >= 20

    try:
        while not started():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.terminate()  # torchrun stops its ranks (SIGKILL after 30 s)
                _, stderr = proc.communicate(timeout=90)
                pytest.fail(
                    f"the run did not reach its third epoch (exit {proc.returncode}): {stderr[-4000:]}"
                )
            time.sleep(0.1)
        proc.send_signal(sig)  # Ctrl-C, or a scheduler's SIGTERM, to torchrun alone: it forwards them
        stdout, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=180)  # ranks left behind finish their 40 short epochs
    # Neither rank fails: torchrun reports a failed rank as "[R]: ... exitcode"; an interrupted one exits 130.
    assert "train.py: error" not in stderr and "ChildFailedError" not in stderr, stderr
    lines = csv.read_text().split("\n")
    assert lines[0] == "type,epoch,start,loading,duration,value1,value2" and lines[-1] == ""
    rows = [line.split(",") for line in lines[1:-1]]
    assert all(len(r) == 7 and all(TIME.match(f) for f in r[2:5]) for r in rows)
    doc = json.loads((out / "run.json").read_text())
    assert doc["status"] == "interrupted" and len(doc["epochs"]) >= 1
    assert [len(e["train"]["ranks"]) for e in doc["epochs"]] == [2] * len(doc["epochs"])
    assert stdout.count("interrupted; results in") == 1
