"""train.py end to end on real files, the real local S3 endpoint and real subprocesses (small arch, CPU)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from shardgen import ShardgenConfig, build

REPO = Path(__file__).resolve().parents[1]
HEADER = "type,epoch,start,loading,duration,value1,value2"
TIME = re.compile(r"^\d+\.\d{6}$")
FRACTION = re.compile(r"^[01]\.\d{6}$")


def run(data: str | Path, out: Path, *extra: str) -> int:
    """train.main in-process with quick defaults (small arch, CPU); `extra` flags override them."""
    args = ["--loader", "torchvision", "--data", str(data), "--epochs", "1", "--batch-size", "64"]
    args += ["--workers", "0", "--device", "cpu", "--arch", "small", "--lr", "0.8", "--out", str(out)]
    return train.main([*args, *extra])


def check_csv(
    path: Path, epochs: int, planned: int, downloads: dict[int, int] | None = None
) -> list[list[str]]:
    """Assert the seed CSV contract; returns the epoch rows (types 0 and 1)."""
    lines = path.read_text().split("\n")
    assert lines[0] == HEADER and lines[-1] == ""  # every row ends with its newline
    rows = [line.split(",") for line in lines[1:-1]]
    for row in rows:
        assert len(row) == 7, row
        assert row[0] in {"0", "1", "2", "10", "11"} and row[1].isdigit(), row
        assert all(TIME.match(field) for field in row[2:5]), row
        assert float(row[3]) <= float(row[4]) + 1e-6, row  # blocked time is part of the wall time
    want = downloads or {}
    head = [r for r in rows if r[0] in {"10", "11"}]
    assert rows[: len(head)] == head, "download rows come first"
    assert {int(r[0]): int(r[5]) for r in head} == want and len(head) == len(want)
    assert all(r[1] == "0" and r[6] == "" for r in head)
    rest, epoch_rows = rows[len(head) :], []
    for epoch in range(1, epochs + 1):
        batches = rest[:planned]
        assert [r[0] for r in batches] == ["2"] * planned and {r[1] for r in batches} == {str(epoch)}
        assert [int(r[5]) for r in batches] == list(range(1, planned + 1))
        assert {int(r[6]) for r in batches} == {planned}
        assert len({r[2] for r in batches}) == 1  # one epoch start
        for column in (3, 4):
            values = [float(r[column]) for r in batches]
            assert values == sorted(values), f"column {column} is not cumulative"
        tr, va = rest[planned], rest[planned + 1]
        assert (tr[0], tr[1], va[0], va[1]) == ("0", str(epoch), "1", str(epoch))
        assert tr[2:5] == batches[-1][2:5], "the epoch row sums its batch rows"
        assert float(va[2]) >= float(tr[2]) + float(tr[4]) - 1e-3  # validation follows training
        epoch_rows += [tr, va]
        rest = rest[planned + 2 :]
    assert rest == []
    for row in epoch_rows:
        assert (row[5] == row[6] == "") or (FRACTION.match(row[5]) and FRACTION.match(row[6])), row
    return epoch_rows


def run_json(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def make_dataset(dest: str | Path, train_samples: int, test_samples: int, **kwargs: object) -> str:
    """A synthetic dataset written by shardgen to `dest` (raw: the fastest to pack)."""
    settings: dict = {"fmt": "raw", "shard_size": 500} | kwargs
    build(
        ShardgenConfig(
            dest=str(dest),
            source="synthetic",
            synthetic_train=train_samples,
            synthetic_test=test_samples,
            allow_download=False,
            **settings,
        )
    )
    return str(dest)


def test_local_run_writes_the_seed_csv_and_run_json(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert run(tiny_dataset, out, "--epochs", "2") == 0
    epoch_rows = check_csv(out / "train.csv", epochs=2, planned=10)
    assert all(FRACTION.match(r[5]) for r in epoch_rows)
    doc = run_json(out)
    assert doc["status"] == "complete" and doc["csv"] == "train.csv"
    assert doc["dataset"]["kind"] == "synthetic" and doc["dataset"]["train_samples"] == 600
    assert doc["device"]["type"] == "cpu" and doc["device"]["amp"] is None
    assert {"torch", "torchvision", "python", "feedrate"} <= set(doc["versions"])
    assert "commit" in doc["git"] and doc["machine"]["cpu_count"] >= 1
    assert doc["config"]["arch"] == "small" and doc["config"]["planned_batches"] == {"train": 10, "test": 4}
    assert doc["counters"]["train"]["bytes_read"] > 0 and doc["downloads"] == []
    assert doc["loader"]["verify"] is True and doc["counters"]["train"]["verified_bytes"] > 0
    assert [e["epoch"] for e in doc["epochs"]] == [1, 2]
    for entry in doc["epochs"]:
        tr = entry["train"]
        assert tr["samples"] == 600 and tr["batches"] == 10 and tr["img_per_s"] > 0
        assert 0 <= tr["data_wait_fraction"] <= 1 and 0 < tr["au"] <= 1
        assert 0 <= tr["top1"] <= tr["top5"] <= 1 and entry["val"]["samples"] == 200
    assert 0 < doc["summary"]["au"] <= 1
    printed = capsys.readouterr().out
    assert "device cpu" in printed and str(out / "train.csv") in printed
    assert "img/s" in printed and "data wait" in printed and "AU" in printed and "top-1" in printed
    assert sorted(os.listdir(out)) == ["run.json", "train.csv"]


def test_max_batches_caps_train_and_validation_and_overwrite_replaces(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "capped"
    assert run(tiny_dataset, out, "--max-batches", "3", "--workers", "2", "--epochs", "2") == 0
    check_csv(out / "train.csv", epochs=2, planned=3)
    doc = run_json(out)
    assert doc["config"]["planned_batches"] == {"train": 3, "test": 3}
    assert [e["val"]["batches"] for e in doc["epochs"]] == [3, 3]
    assert run(tiny_dataset, out, "--max-batches", "2", "--overwrite", "--no-verify") == 0
    check_csv(out / "train.csv", epochs=1, planned=2)
    assert run_json(out)["loader"]["verify"] is False  # run.json says the data went unchecked


@pytest.mark.parametrize("scheme", ["s3", "cos"])
def test_remote_dataset_records_the_downloads(
    scheme: str, bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_dataset(f"s3://{bucket}/ds", 300, 100, shard_size=100)
    out = tmp_path / "remote"
    assert run(f"{scheme}://{bucket}/ds", out, "--max-batches", "2", "--cache-dir", str(tmp_path / "c")) == 0
    check_csv(out / "train.csv", epochs=1, planned=2, downloads={10: 300, 11: 100})
    doc = run_json(out)
    assert [(d["split"], d["samples"]) for d in doc["downloads"]] == [("train", 300), ("test", 100)]
    assert doc["counters"]["train"]["cache_misses"] == 5 and doc["counters"]["test"]["requests"] >= 1
    assert doc["config"]["data"] == f"{scheme}://{bucket}/ds"
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    for text in ((out / "run.json").read_text(), (out / "train.csv").read_text(), capsys.readouterr().out):
        assert secret not in text


def test_small_net_learns_the_synthetic_task(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "ds", 2000, 500)
    out = tmp_path / "learn"
    assert run(data, out, "--epochs", "3", "--workers", "2") == 0
    epoch_rows = check_csv(out / "train.csv", epochs=3, planned=32)
    val_top1 = [float(r[5]) for r in epoch_rows if r[0] == "1"]
    assert val_top1[-1] > 0.5, val_top1  # chance is 0.1
    assert run_json(out)["epochs"][-1]["val"]["top1"] == pytest.approx(val_top1[-1], abs=1e-6)


def test_emulated_accelerator_au_is_high_when_fed_and_low_when_starved(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fed = tmp_path / "fed"
    assert (
        run(
            tiny_dataset,
            fed,
            "--emulate",
            "200",
            "--batch-size",
            "40",
            "--workers",
            "2",
            "--max-batches",
            "6",
        )
        == 0
    )
    epoch_rows = check_csv(fed / "train.csv", epochs=1, planned=6)
    assert all(r[5] == r[6] == "" for r in epoch_rows)  # no model, no accuracy
    doc = run_json(fed)
    assert doc["config"]["emulate"] == 200 and doc["device"]["emulated_img_per_s"] == 200
    assert doc["epochs"][0]["train"]["top1"] is None
    assert doc["epochs"][0]["train"]["au"] > 0.85
    # A device no loader can feed: the default --out lands in results/runs/ under the working directory.
    monkeypatch.chdir(tmp_path)
    args = ["--loader", "torchvision", "--data", str(tiny_dataset), "--device", "cpu", "--workers", "0"]
    assert train.main([*args, "--batch-size", "40", "--emulate", "1e9", "--max-batches", "6"]) == 0
    (starved,) = (tmp_path / "results" / "runs").iterdir()
    assert re.fullmatch(r"\d{8}-\d{6}-torchvision", starved.name)
    assert run_json(starved)["epochs"][0]["train"]["au"] < 0.5


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_epoch_stops_cleanly(sig: signal.Signals, tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "stopped"
    cmd = [sys.executable, str(REPO / "train.py"), "--data", str(tiny_dataset), "--out", str(out)]
    cmd += ["--device", "cpu", "--arch", "small", "--emulate", "100", "--batch-size", "20", "--workers", "1"]
    cmd += ["--epochs", "3"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CI": "1"}
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 90
        csv = out / "train.csv"
        while not (csv.exists() and csv.read_text().count("\n2,") >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    lines = csv.read_text().split("\n")
    assert lines[0] == HEADER and lines[-1] == ""
    rows = [line.split(",") for line in lines[1:-1]]
    assert len(rows) >= 3 and all(len(r) == 7 and all(TIME.match(f) for f in r[2:5]) for r in rows)
    assert {r[0] for r in rows} == {"2"}, "stopped inside the first training epoch"
    doc = run_json(out)
    assert doc["status"] == "interrupted" and doc["epochs"] == []
    assert "interrupted" in stdout


def bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    no_manifest = tmp / "empty-root"
    no_manifest.mkdir()
    return [
        (["--loader", "nope"], "unknown --loader 'nope'; accepted: torchvision"),
        (["--device", "tpu"], "unknown --device 'tpu'; accepted: auto, cuda, cpu"),
        (["--arch", "vgg11"], "unknown --arch 'vgg11'; accepted: resnet50, resnet50-cifar, small"),
        (["--batch-size", "0"], "--batch-size 0 must be >= 1"),
        (["--batch-size", "-3"], "--batch-size -3 must be >= 1"),
        (["--epochs", "two"], "invalid int value: 'two'"),
        (["--emulate", "0"], "--emulate 0.0 must be a positive number"),
        (["--data", str(tmp / "missing")], f"{tmp / 'missing'} does not exist"),
        (["--data", str(no_manifest)], f"no manifest.json at {no_manifest}"),
    ]


def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "never"
    train_only = make_dataset(tmp_path / "train-only", 100, 10, splits=("train",))
    cases = [
        *bad_inputs(tmp_path),
        (["--data", str(train_only)], "split 'test'"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device cuda: no CUDA device"))
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            run(tiny_dataset, out, *extra)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, extra
        assert err.count("\n") == 1 and err.startswith("train.py: error: "), err
        assert message in err, (extra, err)
        assert not out.exists(), extra


def test_an_existing_output_directory_needs_overwrite(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "train.csv").write_text("earlier results\n")
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--data", str(tiny_dataset), "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr
        == f"train.py: error: --out {out} already exists; pass --overwrite or choose another directory\n"
    )
    assert (out / "train.csv").read_text() == "earlier results\n"


# -- the set-up's parts (training.output, training.data, training.device, training.runinfo) -------------
def test_output_dir_checks_and_never_creates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from feedrate.errors import FeedrateError
    from training.output import open_output, output_dir

    monkeypatch.chdir(tmp_path)
    fresh = output_dir(None, "tensor")
    assert fresh.parent == Path("results/runs") and re.fullmatch(r"\d{8}-\d{6}-tensor", fresh.name)
    assert not fresh.exists(), "chosen, not created"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FeedrateError, match="exists and is not a directory"):
        output_dir(tmp_path / "file", "tensor")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "train.csv").write_text("earlier\n")
    with pytest.raises(FeedrateError, match="already exists; pass --overwrite"):
        output_dir(taken, "tensor")
    assert output_dir(taken, "tensor", overwrite=True) == taken
    (taken / "notes.txt").write_text("mine\n")
    open_output(taken)
    assert sorted(os.listdir(taken)) == ["notes.txt"], "a run's own files are cleared, nothing else"
    open_output(None)  # a rank other than 0: nothing to do


def test_a_fresh_output_dir_never_reuses_a_taken_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datetime as dt

    from training import output

    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz: object = None) -> Frozen:  # type: ignore[override]
            return cls(2024, 5, 6, 7, 8, 9)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(output.dt, "datetime", Frozen)
    first = output.output_dir(None, "wds")
    assert first == Path("results/runs/20240506-070809-wds")
    first.mkdir(parents=True)
    second = output.output_dir(None, "wds")
    assert second == Path("results/runs/20240506-070809-wds-2")
    second.mkdir()
    assert output.output_dir(None, "wds").name == "20240506-070809-wds-3"


def test_make_loaders_closes_the_built_ones_when_a_later_one_is_interrupted(
    tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import loaders
    from training import data

    closed: list[str] = []

    class Built:
        def __init__(self, split: str) -> None:
            self.split = split

        def close(self) -> None:
            closed.append(self.split)

    def make_loader(name: str, cfg: loaders.LoaderConfig) -> Built:
        if cfg.split == "test":
            raise KeyboardInterrupt  # a SIGTERM while the validation split is copied
        return Built(cfg.split)

    monkeypatch.setattr(data.loaders, "make_loader", make_loader)
    cfg = train.TrainConfig(**vars(train.get_args_parser().parse_args(["--data", str(tiny_dataset)])))
    with pytest.raises(KeyboardInterrupt):
        data.make_loaders(cfg, torch.device("cpu"))
    assert closed == ["train"]


def test_the_cpu_thread_policy_leaves_the_workers_their_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from training import device
    from training.distributed import Topology

    threads = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(device, "machine", lambda: {"cpu_usable": 8})
    try:
        assert device.resolve_device("cpu", 3) == torch.device("cpu")
        assert torch.get_num_threads() == 5, "8 cores, 3 workers"
        device.resolve_device("cpu", 2, Topology(rank=1, world_size=2, local_rank=1, local_world_size=2))
        assert torch.get_num_threads() == 2, "4 cores per process on this node, 2 workers"
        device.resolve_device("cpu", 16)
        assert torch.get_num_threads() == 1, "never fewer than one"
        line = device.device_line(torch.device("cpu"), "auto", Topology(0, 2, 0, 2))
        assert line == "device cpu (no CUDA device found; 1 compute threads; 2 processes)"
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(3)
        device.resolve_device("cpu", 2)
        assert torch.get_num_threads() == 3, "OMP_NUM_THREADS is the user's word"
    finally:
        torch.set_num_threads(threads)


def test_summary_lines_say_where_the_results_are_and_what_they_show(tmp_path: Path) -> None:
    from training.runinfo import summary_lines

    empty = {"summary": {"img_per_s": None}, "epochs": []}
    assert summary_lines(tmp_path, empty, "interrupted") == [
        f"interrupted; results in {tmp_path / 'train.csv'} (run.json beside it)",
        "no epoch completed; the CSV holds the batches that did",
    ]
    doc = {
        "summary": {"img_per_s": 1234.56, "data_wait_fraction": 0.25, "au": 0.7512},
        "epochs": [{"val": {"top1": 0.41234}}],
        "counters": {"train": {"skipped": 2}, "test": {"skipped": 1}},
    }
    assert summary_lines(tmp_path, doc, "complete")[1:] == [
        "training 1234.6 img/s, data wait 25.0%, AU 75.1%, val top-1 0.412",
        "3 bad samples skipped (--skip-bad; counters in run.json)",
    ]
    what_if = {
        "feed_img_per_s": 4000.0,
        "cached": {"img_per_s": 8000.0},
        "twice_readers": {"img_per_s": 7999.6},
        "au90_accelerator": {"img_per_s": 3600.0},
    }
    doc["epochs"] = [{"train": {"bound_by": "decode", "bound_share": 0.62, "what_if": what_if}, "val": None}]
    assert summary_lines(tmp_path, doc, "complete")[2] == (
        "bound by decode (62% of reader time): readers feed 4,000 img/s; cached 8,000, 2x readers 8,000; "
        "AU < 90% above 3,600 img/s (run.json what_if)"
    )
    doc["epochs"] = [{"train": {"bound_by": "compute", "bound_share": 0.012}, "val": None}]
    assert summary_lines(tmp_path, doc, "complete")[2] == (
        "bound by compute (data wait 1.2% of step time): the loader reports no stage times"
    )


def test_traced_appends_one_line_per_batch_then_steps(tmp_path: Path) -> None:
    from training.trace import TRACE_ENV, trace_path, traced

    assert trace_path({}, 0) is None and trace_path({TRACE_ENV: " "}, 0) is None
    path = trace_path({TRACE_ENV: str(tmp_path / "t")}, 1)
    assert path == tmp_path / "t.rank1"
    seen: list[int] = []
    step = traced(lambda x, y: seen.append(len(y)), path, 1, "train", 2)
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    step(images, torch.tensor([3, 7]))
    (line,) = [json.loads(text) for text in path.read_text().splitlines()]
    assert line == {
        "rank": 1,
        "split": "train",
        "epoch": 2,
        "labels": [3, 7],
        "centre": images[:, :, 2, 2].tolist(),
    }
    assert seen == [2]
    untouched = lambda x, y: None  # noqa: E731
    assert traced(untouched, None, 0, "train", 1) is untouched


@pytest.mark.parametrize("loader", ["wds", "tensor"])
def test_the_loaders_are_told_how_many_epochs_train_py_reads(loader: str, tiny_dataset: Path) -> None:
    """So that none prepares an epoch past the last (loaders.base.LoaderConfig.last_epoch): train.py's
    epochs are 1..--epochs, so the last is --epochs itself."""
    from training import data

    args = ["--data", str(tiny_dataset), "--loader", loader, "--epochs", "3"]
    cfg = train.TrainConfig(**vars(train.get_args_parser().parse_args(args)))
    made = data.make_loaders(cfg, torch.device("cpu"))
    try:
        assert {split: m.cfg.last_epoch for split, m in made.items()} == {"train": 3, "test": 3}
    finally:
        data.close_loaders(made)
