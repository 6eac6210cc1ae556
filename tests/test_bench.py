"""make bench: the bench JSON's fields, ratios to the baseline measured first and last in the same run,
the unsteady-run rule, CPU time per image, the peers, skipped variants. No speed or ratio is asserted."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

import loaders
from bench import peers
from bench.baseline import add_ratios, describe, spread, summarise, unsteady
from bench.cpu import tree_cpu_s
from bench.datasets import ensure_dataset
from bench.measure import measure
from bench.tables import stage_cell
from bench.variants import FIRST, LAST, Variant, plan
from loaders.base import CIFAR10_MEAN, CIFAR10_STD
from loaders.stagetimes import STAGES

REPO = Path(__file__).resolve().parents[1]
FIELDS = {"loader", "storage", "encoding", "workers", "samples", "seconds", "img_per_s", "ratio_to_baseline"}


def _plan_args(**changes: object) -> argparse.Namespace:
    base = dict(
        loaders=["dali", "wds", "torchvision"], storage=["local", "s3"], formats=["jpg"], workers=[2], net=[]
    )
    return argparse.Namespace(**{**base, "peers": False, **changes})


def test_plan_measures_the_baseline_first_and_last_and_skips_gpu_only_variants() -> None:
    variants = plan(_plan_args(), cuda=False)
    assert variants[0] == (Variant("torchvision", "local", "batches", 2, "cpu", baseline_pass=FIRST), None)
    assert variants[-1] == (Variant("torchvision", "local", "batches", 2, "cpu", baseline_pass=LAST), None)
    baselines = [v for v, _ in variants if (v.loader, v.storage) == ("torchvision", "local")]
    assert len(baselines) == 2, "the baseline's two passes, no third"
    assert {v.net for v, _ in variants if v.storage == "s3"} == {"loopback"}, "unshaped without --net"
    shaped = plan(_plan_args(net=["same-region", "home"]), cuda=False)
    assert {v.net for v, _ in shaped if v.storage == "s3"} == {"same-region", "home"}
    assert {v.net for v, _ in shaped if v.storage == "local"} == {""}, "local data has no network"
    assert len(shaped) == len(variants) + sum(1 for v, _ in variants if v.storage == "s3")
    skipped = [(v, why) for v, why in variants if why]
    assert {v.device for v, _ in skipped} == {"cuda"} and all("GPU" in why for _, why in skipped)
    assert {v.loader for v, _ in skipped} == {"dali"}
    assert len(variants) == len(set(v for v, _ in variants))
    # the baseline is measured even when not asked for, per worker count, first ones first
    two = plan(_plan_args(loaders=["wds"], storage=["s3"], workers=[0, 2]), cuda=False)
    assert [(v.workers, v.baseline_pass) for v, _ in two[:2] + two[-2:]] == [
        (0, FIRST), (2, FIRST), (0, LAST), (2, LAST)
    ]  # fmt: skip
    assert all(v.loader == "wds" for v, _ in two[2:-2])
    # on a GPU machine the torchvision loader's CUDA row stays an ordinary row beside the baseline
    on_gpu = plan(_plan_args(), cuda=True)
    assert Variant("torchvision", "local", "batches", 2, "cuda") in [v for v, _ in on_gpu]


def test_plan_adds_the_peers_per_encoding_for_local_storage_and_skips_a_missing_library(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    variants = plan(_plan_args(peers=True, formats=["jpg", "raw"]), cuda=False)
    rows = [(v.loader, v.encoding) for v, _ in variants if peers.is_peer(v.loader)]
    assert sorted(rows) == sorted((p, e) for p in peers.PEERS for e in ("jpg", "raw"))
    assert all(v.storage == "local" and v.device == "cpu" for v, _ in variants if peers.is_peer(v.loader))
    assert variants[-1][0].baseline_pass == LAST, "the peers run before the closing baseline"
    assert not any(peers.is_peer(v.loader) for v, _ in plan(_plan_args(peers=True, storage=["s3"]), False))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "webdataset" else real(n, *a))
    reasons = {
        v.loader: why for v, why in plan(_plan_args(peers=True), cuda=False) if peers.is_peer(v.loader)
    }
    assert set(reasons) == {"peer:webdataset", "peer:dali-plain"}
    assert (
        reasons["peer:webdataset"] == "peer:webdataset needs the webdataset package, which is not installed"
    )
    if loaders.unavailable("dali") is None:  # DALI here: its peer runs
        assert reasons["peer:dali-plain"] is None
    else:
        assert "dali" in str(reasons["peer:dali-plain"]).lower()


def test_a_peer_whose_library_cannot_be_imported_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(peers.FeedrateError, match="unknown peer peer:ffcv; accepted: peer:dali-plain"):
        peers.unavailable("peer:ffcv")
    with pytest.raises(peers.FeedrateError, match="peers read local shards; got s3://b/raw"):
        peers.build_peer("peer:webdataset", "s3://b/raw", batch_size=8, workers=0, device="cpu")
    with pytest.raises(peers.FeedrateError, match="peers run on the CPU; got device 'cuda'"):
        peers.build_peer("peer:webdataset", "data", batch_size=8, workers=0, device="cuda")
    monkeypatch.setitem(sys.modules, "webdataset", None)
    with pytest.raises(peers.FeedrateError, match="needs the webdataset package, which is not installed"):
        peers.build_peer("peer:webdataset", "unused", batch_size=8, workers=0, device="cpu")
    monkeypatch.setattr(peers, "unavailable", lambda name: None)  # found, but its import fails
    with pytest.raises(peers.FeedrateError, match="peer:webdataset could not import its library"):
        peers.build_peer("peer:webdataset", "unused", batch_size=8, workers=0, device="cpu")


def test_the_spread_rule_flags_passes_more_than_15_percent_apart() -> None:
    assert spread(100, 116) == pytest.approx(0.16) and spread(116, 100) == pytest.approx(0.16)
    assert unsteady(100, 116) and unsteady(116, 100)
    assert not unsteady(100, 115) and not unsteady(115, 100), "exactly 15% apart is not more than 15%"
    assert not unsteady(100, 114) and not unsteady(9_000, 8_000)
    assert unsteady(11_000, 4_000) and unsteady(100, 130, threshold=0.25) is True
    assert not unsteady(100, 120, threshold=0.25)
    with pytest.raises(ValueError, match="must be > 0 img/s; got 0 and 100"):
        spread(0, 100)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """512 training samples per encoding: two batches of 256, so one epoch is every sample."""
    root = tmp_path_factory.mktemp("bench-data")
    for fmt in ("jpg", "png", "raw"):
        ensure_dataset(root / fmt, fmt, 512, 64)
    return root


def _labels_in_shards(root: Path) -> Counter:
    labels: Counter = Counter()
    for shard in sorted(root.glob("train-*.tar")):
        with tarfile.open(shard) as tar:
            labels.update(int(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".cls"))
    return labels


def test_ascii_labels_parses_a_batch_of_padded_digits() -> None:
    padded = torch.tensor(
        [[55, 0, 0, 0], [49, 50, 0, 0], [57, 57, 57, 57], [48, 10, 0, 0]], dtype=torch.uint8
    )
    assert peers.ascii_labels(padded).tolist() == [7, 12, 9999, 0]


@pytest.mark.parametrize("name", peers.PEERS)
@pytest.mark.parametrize("fmt", ["jpg", "png", "raw"])
def test_peer_reads_every_sample_once_per_epoch_augmented(name: str, fmt: str, tiny: Path) -> None:
    if peers.unavailable(name):
        pytest.skip(peers.unavailable(name))
    workers = 2 if name == peers.DALI_PLAIN else 0  # DALI: two threads; wds: no worker processes (fast)
    peer = peers.build_peer(name, str(tiny / fmt), batch_size=256, workers=workers, device="cpu")
    try:
        batches = list(peer)
    finally:
        peer.close()
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    assert images.shape == (512, 3, 32, 32) and images.dtype == torch.float32
    assert Counter(labels.tolist()) == _labels_in_shards(tiny / fmt), "each sample once, its own label"
    # the 4-pixel zero padding shows as a border of normalised black in some crops, not in all
    black = torch.tensor([-m / s for m, s in zip(CIFAR10_MEAN, CIFAR10_STD, strict=True)]).view(3, 1)
    top_black = torch.isclose(images[:, :, 0, :], black, atol=1e-4).all(dim=(1, 2))
    assert 0 < int(top_black.sum()) < 512


@pytest.mark.parametrize("name", ["torchvision", peers.DALI_PLAIN, peers.WEBDATASET])
def test_measure_reports_the_process_trees_cpu_time_per_image(name: str, tiny: Path) -> None:
    if peers.is_peer(name) and peers.unavailable(name):
        pytest.skip(peers.unavailable(name))
    result = measure(
        name, str(tiny / "jpg"), batch_size=64, workers=2, samples=256, warmup=1, repeats=2, device="cpu"
    )
    assert result["cpu_us_per_img"] > 0 and len(result["repeats_img_per_s"]) == 2
    stages = result["stages_cpu_us_per_img"]
    if peers.is_peer(name):  # peers keep no stage counters
        assert stages is None and result["stages_wall_us_per_img"] is None
    else:  # every stage separable; their CPU is part of the process tree's (never more than it)
        assert list(stages) == list(STAGES) and stages["storage"] == 0
        assert stages["decode"] > 0 and stages["augment"] > 0
        assert sum(stages.values()) <= result["cpu_us_per_img"]


def test_the_stage_cell_lists_what_the_loader_separates_in_the_contracts_order() -> None:
    assert stage_cell({"queue": 0.04, "storage": 8.06, "decode": 2.0}) == "st 8.1 · de 2.0 · q 0.0"
    assert stage_cell(None) == "" and stage_cell({}) == ""


def _row(loader: str, img_per_s: float, workers: int = 2, when: str = "", **extra: object) -> dict:
    row = {"loader": loader, "storage": "local", "encoding": "raw", "workers": workers, "device": "cpu"}
    row.update(img_per_s=img_per_s, **extra)
    return {**row, "baseline_pass": when} if when else row


def test_ratios_are_to_the_mean_of_both_passes_and_an_unsteady_run_is_marked() -> None:
    results = [
        _row("torchvision", 8_000, when=FIRST),
        _row("torchvision", 100, workers=0, when=FIRST),
        _row("wds", 50_000),
        _row("wds", 900, workers=0),
        _row("torchvision", 6_000, when=LAST),
        _row("torchvision", 110, workers=0, when=LAST),
    ]
    summary = summarise(results)
    add_ratios(results, summary)
    by = {(e["workers"]): e for e in summary["passes"]}
    assert by[2]["mean_img_per_s"] == 7_000 and by[2]["spread"] == pytest.approx(0.333, abs=1e-3)
    assert by[2]["flagged"] and "differ by 33%" in by[2]["why"]
    assert by[0]["mean_img_per_s"] == 105 and not by[0]["flagged"] and by[0]["why"] is None
    assert summary["flagged"] and summary["threshold"] == 0.15
    assert [r["ratio_to_baseline"] for r in results] == [
        round(8_000 / 7_000, 3), round(100 / 105, 3), round(50_000 / 7_000, 3), round(900 / 105, 3),
        round(6_000 / 7_000, 3), round(110 / 105, 3),
    ]  # fmt: skip
    text = describe(summary)
    assert "first 8,000 img/s, last 6,000 img/s; mean 7,000 img/s" in text and "spread 33.3%" in text
    assert text.count("WARNING: unsteady run") == 1 and "(2 workers)" in text.split("WARNING")[1]
    # a missing last pass: the ratio base is the first alone, and the run is marked as not known steady
    lone = [_row("torchvision", 8_000, when=FIRST), {**_row("torchvision", 0, when=LAST), "skipped": "x"}]
    summary = summarise(lone)
    assert summary["passes"][0]["mean_img_per_s"] == 8_000 and summary["flagged"]
    assert "the last baseline pass did not run" in summary["passes"][0]["why"]
    steady = summarise([_row("torchvision", 8_000, when=FIRST), _row("torchvision", 7_500, when=LAST)])
    assert not steady["flagged"] and "WARNING" not in describe(steady)


def test_tree_cpu_time_counts_worker_processes_that_ran_and_ended() -> None:
    ctx = torch.multiprocessing.get_context("fork")
    before = tree_cpu_s()
    workers = [ctx.Process(target=_burn, args=(0.3,)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert tree_cpu_s() - before >= 0.55, "both children's CPU seconds, though they have ended"


def _burn(seconds: float) -> None:
    import time

    start = time.process_time()
    while time.process_time() - start < seconds:
        pass


def test_bench_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    cmd = [
        sys.executable, "-m", "bench",
        "--loaders", "torchvision,wds",
        "--storage", "local,s3",
        "--formats", "raw",
        "--samples", "256", "--train-size", "600", "--batch-size", "64",
        "--repeats", "1", "--warmup", "1", "--workers", "0",
        "--net", "home",
        "--data-dir", str(tmp_path / "data"), "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "CI": "true", "AWS_EC2_METADATA_DISABLED": "true"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    doc = json.loads((out / "bench.json").read_text())
    assert doc["machine"]["cpu_count"] >= 1
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    assert doc["code"]["commit"] == head.stdout.strip(), "the figures name the commit they are of"
    results = doc["results"]
    # the baseline first and last; the ratios are to the mean of its two passes
    first, last = results[0], results[-1]
    assert (first["loader"], first["storage"], first["baseline_pass"]) == ("torchvision", "local", "first")
    assert (last["loader"], last["storage"], last["baseline_pass"]) == ("torchvision", "local", "last")
    (passes,) = doc["baseline"]["passes"]
    assert (passes["first_img_per_s"], passes["last_img_per_s"]) == (first["img_per_s"], last["img_per_s"])
    mean = (first["img_per_s"] + last["img_per_s"]) / 2
    assert passes["mean_img_per_s"] == pytest.approx(mean, abs=0.1)
    assert doc["baseline"]["flagged"] == unsteady(first["img_per_s"], last["img_per_s"])
    rows = {(r["loader"], r["storage"]): r for r in results[1:-1]}
    assert set(rows) == {
        ("torchvision", "s3"),
        ("wds", "local"),
        ("wds", "s3"),
        *((p, "local") for p in peers.PEERS),
    }
    for row in results:
        if "skipped" in row:
            assert peers.is_peer(row["loader"]) and peers.unavailable(row["loader"]) == row["skipped"]
            continue
        assert set(row) >= FIELDS | {"cpu_us_per_img"}, row
        assert row["samples"] >= 256 and row["seconds"] > 0 and row["cpu_us_per_img"] > 0
        assert row["img_per_s"] == pytest.approx(row["samples"] / row["seconds"], rel=0.01)
        assert row["ratio_to_baseline"] == pytest.approx(row["img_per_s"] / mean, rel=0.01, abs=5e-4), (
            "rounded to 3 places"
        )
    for name in peers.PEERS:  # the peers really ran here (both libraries are in requirements.txt)
        if not peers.unavailable(name):
            assert "skipped" not in rows[(name, "local")] and rows[(name, "local")]["encoding"] == "raw"
    # Remote wds streams each shard with one GET per epoch, counted at the server, through the shaping
    # proxy set to the home preset; each remote row is set beside the same loader on local disk.
    # (reading ahead, a reader may have started the next epoch's shard too: one epoch more at most)
    wds = rows[("wds", "s3")]
    assert wds["gets_per_shard_epoch"] > 0 and wds["shard_gets"] <= wds["shard_gets_bound"]
    for loader, local_img_per_s in (("torchvision", mean), ("wds", rows[("wds", "local")]["img_per_s"])):
        remote = rows[(loader, "s3")]
        assert remote["net"] == "home" and "net" not in rows[("wds", "local")]
        assert remote["ratio_to_local"] == pytest.approx(
            remote["img_per_s"] / local_img_per_s, rel=0.01, abs=5e-4
        )
        assert remote["prefetch_plan"]["source"] == "measured"
        assert 0 <= remote["endpoint_cpu_share"] < 1, "the endpoint's share of the CPUs (timed passes)"
        # home: 40 +- 10 ms to the first byte; a busy 2-core machine may see it later, never sooner
        assert 30 <= remote["prefetch_plan"]["link"]["latency_ms"] <= 2_000
    assert doc["config"]["networks"]["home"]["total_MBps"] == 12.5
    table = (out / "bench.md").read_text()
    assert f"Code: commit {doc['code']['commit'][:12]}" in table
    assert "| wds | s3 | home | raw | 0 | cpu |" in table and "× baseline" in table and "× local" in table
    assert "| torchvision (first) | local |" in table and "| torchvision (last) | local |" in table
    assert "Baseline (torchvision, local, 0 workers): first " in table and "CPU µs/img" in table
    assert ("WARNING: unsteady run" in table) == doc["baseline"]["flagged"]
    peer_section = table.split("feedrate against the peers")[1].split("Remote / local")[0]
    assert "| raw | 0 | " in peer_section and "| wds (" in peer_section, "wds is the fastest shard reader run"
    assert "| wds | s3 | raw | 0 | cpu | " in table.split("Remote / local")[1], "the per-network table"
    assert "| wds | s3 | home | raw |" in done.stdout
    # each feedrate row's stage CPU per image, from the loader's own counters over the timed passes
    for key in (("wds", "local"), ("wds", "s3"), ("torchvision", "s3")):
        stages = rows[key]["stages_cpu_us_per_img"]
        assert list(stages) == list(STAGES) and sum(stages.values()) <= rows[key]["cpu_us_per_img"], key
    assert "stage CPU µs/img" in table and "| st 0.0 · de " in table, "the baseline's in-memory split"


def test_bad_selection_is_one_line_exit_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--loaders", "ffcv", "--out", str(tmp_path)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert (
        done.stderr.strip() == "bench: error: unknown loader ffcv; accepted: torchvision, wds, dali, tensor"
    )
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--net", "moon", "--out", str(tmp_path)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "bench: error: unknown network preset moon; accepted: same-region, cross-region, home"
    )
