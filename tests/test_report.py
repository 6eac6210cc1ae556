"""The report on hand-made CSVs (known figures) and on real short runs of train.py."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from feedrate.errors import FeedrateError
from report.__main__ import build_report, main
from report.runs import find_runs

HEADER = "type,epoch,start,loading,duration,value1,value2\n"


def _write_run(
    folder: Path,
    loader: str,
    workers: int,
    emulate: float | None,
    batches: list[tuple[float, float]],
    train: dict | None = None,
):
    """A run whose batches take (loading, step) seconds each, one epoch, plus run.json (`train`: more of
    its epoch's train record, e.g. stages and bound_by)."""
    folder.mkdir(parents=True)
    lines = [HEADER, "10,0,1700000000.000000,0.500000,0.750000,1000,\n"]
    cum_l = cum_d = 0.0
    for i, (load, step) in enumerate(batches, start=1):
        cum_l += load
        cum_d += load + step
        lines.append(f"2,1,1700000001.000000,{cum_l:.6f},{cum_d:.6f},{i},{len(batches)}\n")
    lines.append(f"0,1,1700000001.000000,{cum_l:.6f},{cum_d:.6f},0.500000,0.900000\n")
    lines.append("1,1,1700000009.000000,0.100000,1.000000,0.600000,0.950000\n")
    (folder / "train.csv").write_text("".join(lines))
    meta = {
        "config": {"loader": loader, "data": "s3://b/ds", "workers": workers, "emulate": emulate},
        "dataset": {"kind": "synthetic"},
        "epochs": [{"epoch": 1, "train": {"samples": 100 * len(batches)} | (train or {})}],
    }
    (folder / "run.json").write_text(json.dumps(meta))


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    # First batch (excluded from AU) is slow; then 1 s loading + 3 s step each: AU = 0.75.
    _write_run(root / "a", "wds", 2, None, [(5.0, 1.0), (1.0, 3.0), (1.0, 3.0)])
    # Emulated sweep for the tensor loader: AU 1.0 at 100 img/s, 0.5 at 1000 img/s.
    _write_run(root / "e100", "tensor", 0, 100.0, [(2.0, 1.0), (0.0, 1.0), (0.0, 1.0)])
    _write_run(root / "e1000", "tensor", 0, 1000.0, [(2.0, 1.0), (1.0, 1.0), (1.0, 1.0)])
    return root


def test_summary_figures_match_the_csv(runs_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    build_report([runs_dir], out)
    with open(out / "summary.csv", newline="") as f:
        rows = {r["run"].rsplit("/", 1)[-1]: r for r in csv.DictReader(f)}
    a = rows["a"]
    assert a["variant"] == "wds/s3/w2" and a["dataset_kind"] == "synthetic"
    assert float(a["epoch_s"]) == pytest.approx(14.0)
    assert float(a["loading_s"]) == pytest.approx(7.0)
    assert float(a["data_wait_fraction"]) == pytest.approx(0.5)
    assert float(a["au"]) == pytest.approx(0.75)
    assert float(a["img_per_s"]) == pytest.approx(300 / 14.0)
    assert float(a["train_top1"]) == 0.5 and float(a["val_top1"]) == 0.6 and float(a["val_top5"]) == 0.95
    assert float(rows["e100"]["au"]) == pytest.approx(1.0)
    assert float(rows["e1000"]["au"]) == pytest.approx(0.5)
    md = (out / "summary.md").read_text()
    assert "synthetic CIFAR-shaped data" in md
    sweep_line = next(line for line in md.splitlines() if line.startswith("| tensor | s3 | 0 |"))
    assert sweep_line.rstrip().endswith("| 100 |"), sweep_line


def test_plots_are_real_images(runs_dir: Path, tmp_path: Path) -> None:
    files = build_report([runs_dir], tmp_path / "r")
    pngs = [f for f in files if f.suffix == ".png"]
    assert [p.name for p in pngs] == [
        "loading_vs_compute.png",
        "cumulative_loading.png",
        "throughput.png",
        "accuracy.png",
        "au_vs_rate.png",  # two emulated runs; no loader reported stages: no stage_times.png
    ]
    assert "No loader in these runs reported per-stage times" in (tmp_path / "r" / "summary.md").read_text()
    for png in pngs:
        pixels = np.asarray(Image.open(png).convert("L"))
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300
        assert pixels.std() > 5, f"{png.name} is not blank"


def test_what_the_training_log_writes_the_report_reads(tmp_path: Path) -> None:
    """The writer (training.results.CsvLog) and the reader share one contract: every row type it writes
    comes back with its figures, and the literal header here is the one the writer puts on top."""
    from training.results import CSV_NAME, TRAIN_EPOCH, VAL_EPOCH, CsvLog
    from training.timing import BatchTime, EpochStats

    folder = tmp_path / "run"
    folder.mkdir()
    with CsvLog(folder / CSV_NAME) as log:
        log.download("train", 1700000000.0, 0.25, 0.5, 300)
        log.download("test", 1700000000.5, 0.125, 0.25, 100)
        for i in (1, 2):
            log.batch(1, 1700000001.0, BatchTime(i, 64, 0.5, 1.5, 0.5 * i, 2.0 * i), 2)
        log.epoch(TRAIN_EPOCH, 1, EpochStats(1700000001.0, 2, 128, 1.0, 4.0, 3.0, 2.0), 0.5, 0.875)
        log.epoch(VAL_EPOCH, 1, EpochStats(1700000005.0, 1, 64, 0.25, 1.0, 0.75, 1.0), 0.625, 1.0)
    assert (folder / CSV_NAME).read_text().splitlines()[0] + "\n" == HEADER
    (run,) = find_runs([folder])
    assert run.downloads == [(10, 0.25, 0.5, 300), (11, 0.125, 0.25, 100)]
    assert [(b.batch, b.planned, b.loading, b.duration) for b in run.batches] == [
        (1, 2, 0.5, 2.0),
        (2, 2, 1.0, 4.0),
    ]
    assert [(e.epoch, e.loading, e.duration, e.top1, e.top5) for e in run.train] == [
        (1, 1.0, 4.0, 0.5, 0.875)
    ]
    assert [(e.epoch, e.top1, e.top5) for e in run.val] == [(1, 0.625, 1.0)]
    assert run.au_from_csv(1) == pytest.approx(0.75)


def test_one_run_folder_and_duplicate_labels(runs_dir: Path, tmp_path: Path) -> None:
    single = find_runs([runs_dir / "a"])
    assert [r.label for r in single] == ["wds/s3/w2"]
    _write_run(runs_dir / "a2", "wds", 2, None, [(1.0, 1.0), (1.0, 1.0)])
    labels = [r.label for r in find_runs([runs_dir])]
    assert len(labels) == len(set(labels)), labels


def test_bad_inputs(tmp_path: Path, capsys) -> None:
    with pytest.raises(FeedrateError, match="no feedrate CSV"):
        find_runs([tmp_path])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.csv").write_text(HEADER + "2,1,0.0,0.1\n")
    with pytest.raises(FeedrateError, match="4 fields, expected 7"):
        find_runs([bad])
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert "does not exist" in capsys.readouterr().err


def test_report_on_real_short_runs(tiny_dataset: Path, tmp_path: Path) -> None:
    import train

    runs = tmp_path / "runs"
    common = ["--data", str(tiny_dataset), "--epochs", "2", "--batch-size", "64", "--workers", "0"]
    assert (
        train.main(["--loader", "torchvision", *common, "--arch", "small", "--out", str(runs / "model")]) == 0
    )
    assert train.main(["--loader", "tensor", *common, "--emulate", "50000", "--out", str(runs / "emu")]) == 0
    files = build_report([runs], tmp_path / "report")
    with open(tmp_path / "report" / "summary.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["variant"], r["epoch"]) for r in table] == [
        ("tensor/local/w0/emu50000", "1"),
        ("tensor/local/w0/emu50000", "2"),
        ("torchvision/local/w0", "1"),
        ("torchvision/local/w0", "2"),
    ]
    # The summary's figures are the CSV's: epoch time and loading of each type 0 row.
    for row in table:
        run_csv = Path(row["run"]) / "train.csv"
        with open(run_csv, newline="") as f:
            epoch_rows = [r for r in csv.DictReader(f) if r["type"] == "0" and r["epoch"] == row["epoch"]]
        assert float(row["epoch_s"]) == pytest.approx(float(epoch_rows[0]["duration"]), abs=1e-6)
        assert float(row["loading_s"]) == pytest.approx(float(epoch_rows[0]["loading"]), abs=1e-6)
        run_json = json.loads((Path(row["run"]) / "run.json").read_text())
        au = run_json["epochs"][int(row["epoch"]) - 1]["train"]["au"]
        assert float(row["au"]) == pytest.approx(au, abs=1e-6), "AU is run.json's (it times the step)"
        run = find_runs([Path(row["run"])])[0]
        assert run.au_from_csv(int(row["epoch"])) >= au - 1e-6, "the CSV estimate is an upper bound"
    assert table[2]["train_top1"] != "" and table[0]["train_top1"] == ""
    assert all(f.stat().st_size > 0 for f in files)


def test_remote_runs_through_a_shaped_link_are_set_beside_local_ones(
    tiny_dataset: Path, tmp_path: Path, s3_env, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train.py from S3 through the shaping proxy (home preset, named with --net) and from local disk:
    the report pairs them and says how many AU points the network cost."""
    import train
    from bench.datasets import upload
    from feedrate.network import preset
    from rig.netproxy import NetProxy

    url = f"s3://{bucket}/tiny"
    upload(tiny_dataset, url)
    runs = tmp_path / "runs"
    common = [
        "--loader",
        "wds",
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--workers",
        "0",
        "--emulate",
        "20000",
    ]
    assert train.main([*common, "--data", str(tiny_dataset), "--out", str(runs / "local")]) == 0
    with NetProxy(s3_env.endpoint, link=preset("home"), seed=3) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        assert train.main([*common, "--data", url, "--net", "home", "--out", str(runs / "home")]) == 0
    meta = json.loads((runs / "home" / "run.json").read_text())
    assert meta["config"]["net"] == "home"
    assert meta["loader"]["prefetch_plan"]["source"] == "option"
    assert meta["loader"]["prefetch_plan"]["link"]["name"] == "home"
    build_report([runs], tmp_path / "report")
    with open(tmp_path / "report" / "summary.csv", newline="") as f:
        table = {r["variant"]: r for r in csv.DictReader(f)}
    assert set(table) == {"wds/local/w0/emu20000", "wds/s3@home/w0/emu20000"}
    assert table["wds/s3@home/w0/emu20000"]["net"] == "home"
    md = (tmp_path / "report" / "summary.md").read_text()
    section = md.split("## Remote vs local disk, per network")[1]
    row = next(line for line in section.splitlines() if line.startswith("| wds | s3 | home |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    au_local, au_remote, lost = float(cells[6][:-1]), float(cells[7][:-1]), float(cells[8])
    assert lost == pytest.approx(au_local - au_remote, abs=0.11)
    with pytest.raises(SystemExit) as exit_info:
        train.main([*common, "--data", url, "--net", "moon", "--out", str(runs / "bad")])
    assert exit_info.value.code == 2 and not (runs / "bad").exists()


def test_variants_sort_by_their_numbers_and_every_line_has_its_own_colour(tmp_path: Path) -> None:
    from report.plots import palette

    root = tmp_path / "sweep"
    rates = (100000, 3000, 1000, 30000, 10000)
    for loader in ("tensor", "torchvision", "wds", "dali"):
        for rate in rates:
            _write_run(root / f"{loader}-{rate}", loader, 2, float(rate), [(0.1, 1.0), (0.1, 1.0)])
    runs = find_runs([root])
    assert [r.label for r in runs[:5]] == [f"dali/s3/w2/emu{r}" for r in sorted(rates)]
    assert [r.emulate for r in runs if r.loader == "tensor"] == sorted(rates)
    colours = palette([(r.loader, r.label) for r in runs])
    assert len(set(colours.values())) == len(runs) == 20
    # Within a loader's colour family the shade darkens with the rate: the sweep reads light to dark.
    for loader in ("tensor", "wds"):
        light = [sum(colours[r.label][:3]) for r in runs if r.loader == loader]
        assert light == sorted(light, reverse=True), loader
    files = build_report([root], tmp_path / "r")
    assert tmp_path / "r" / "au_vs_rate.png" in files
    md = (tmp_path / "r" / "summary.md").read_text()
    sweep = next(line for line in md.splitlines() if line.startswith("| tensor | s3 | 2 |"))
    assert "1000, 3000, 10000, 30000, 100000" in sweep


def test_stage_plot_and_verdicts_from_run_json(runs_dir: Path, tmp_path: Path) -> None:
    what_if = {
        "feed_img_per_s": 1500.0,
        "cached": {"img_per_s": 3000.0},
        "twice_readers": {"img_per_s": 2900.0},
        "au90_accelerator": {"img_per_s": 1350.0},
    }
    staged = {
        "stages": {"storage": 0.3, "decode": 1.24, "augment": 0.36, "queue": 0.1},
        "bound_by": "decode",
        "bound_share": 0.62,
        "what_if": what_if,
    }
    _write_run(runs_dir / "s", "wds", 4, None, [(1.0, 1.0), (1.0, 1.0)], staged)
    _write_run(
        runs_dir / "c",
        "dali",
        4,
        None,
        [(0.0, 1.0), (0.0, 1.0)],
        {"bound_by": "compute", "bound_share": 0.012},
    )
    out = tmp_path / "r"
    files = build_report([runs_dir], out)
    assert out / "stage_times.png" in files
    pixels = np.asarray(Image.open(out / "stage_times.png").convert("L"))
    assert pixels.std() > 5
    md = (out / "summary.md").read_text()
    assert "| wds/s3/w4 | 1 |" in md and "| decode (62%) |" in md and "| compute (wait 1.2%) |" in md
    assert "| wds/s3/w4 | 1 | decode (62%) | 1,500 | 3,000 | 2,900 | 1,350 |" in md
    with open(out / "summary.csv", newline="") as f:
        rows = {r["run"].rsplit("/", 1)[-1]: r for r in csv.DictReader(f)}
    assert rows["s"]["bound_by"] == "decode" and float(rows["s"]["au90_accelerator_img_per_s"]) == 1350
    assert rows["a"]["bound_by"] == "" and rows["a"]["feed_img_per_s"] == ""
    # A later report without stages removes the stale picture.
    build_report([runs_dir / "a"], out)
    assert not (out / "stage_times.png").exists()
