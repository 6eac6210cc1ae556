"""The loaders' stage times (loaders.stagetimes): they add up to where the readers' time went, they put
constructed bottlenecks where they are through train.py, and they survive torchrun. Real loaders, real
shards, a real S3 server behind the shaping proxy; never a timing threshold (only accounting: one measured
span against the sum of its parts)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from test_distributed import quick_args, torchrun

import train
from loaders import LoaderConfig, make_loader
from loaders.stagetimes import STAGES, stage_times
from training.stages import between

READER_STAGES = ("storage", "decode", "augment")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Synthetic raw and png datasets: 4,000 training images in shards of 500, 500 test images."""
    from shardgen import ShardgenConfig, build

    base = tmp_path_factory.mktemp("stage-times")
    for fmt in ("raw", "png"):
        build(
            ShardgenConfig(
                dest=str(base / fmt),
                source="synthetic",
                fmt=fmt,
                shard_size=500,
                synthetic_train=4000,
                synthetic_test=500,
                allow_download=False,
            )
        )
    return {fmt: base / fmt for fmt in ("raw", "png")}


def _epoch(loader, epoch: int) -> tuple[float, float, dict]:
    """(wall s, this thread's CPU s, the loader's stage seconds) of one epoch taken as fast as it comes."""
    loader.set_epoch(epoch)
    before = stage_times(loader)
    wall, cpu = time.perf_counter(), time.thread_time()
    for _images, _labels in loader:
        pass
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    return wall, cpu, between(before, stage_times(loader))


@pytest.mark.parametrize("fmt", ["raw", "png"])
def test_one_wds_readers_stages_account_for_its_busy_time(fmt: str, datasets: dict[str, Path]) -> None:
    """One reader thread (workers=1) and a consumer that only takes batches: the reader's wall time is
    the epoch's (it starts when the epoch does, and its last batch ends it), and it is never blocked on
    a full queue (the consumer takes each batch at once, so the queue holds at most the one being
    handed on). Its busy time is then the epoch's wall time, and everything it does is a stage:
    waiting for shard bytes (storage), drawing and decoding batches, augmenting them. Their wall
    seconds must account for the epoch within 10% -- never more than it (nothing counted twice), and
    not much less (nothing left out)."""
    cfg = LoaderConfig(data=str(datasets[fmt]), split="train", batch_size=256, train=True, workers=1)
    with make_loader("wds", cfg) as loader:
        _epoch(loader, 0)  # first epoch: thread pools and the page cache warm up
        wall, _cpu, stages = _epoch(loader, 1)
    assert set(stages["wall"]) == set(STAGES) == set(stages["cpu"])
    reader = sum(stages["wall"][s] for s in READER_STAGES)
    assert 0.9 * wall <= reader <= 1.02 * wall, (wall, stages)
    assert stages["wall"]["decode"] > 0 and stages["wall"]["augment"] > 0
    assert stages["cpu"]["storage"] > 0, "the fetch thread reads and hashes every shard"


@pytest.mark.parametrize("loader_name", ["wds", "torchvision"])
def test_without_workers_the_consumer_threads_cpu_is_its_stages(
    loader_name: str, datasets: dict[str, Path]
) -> None:
    """With workers=0 the reader runs in the consumer's thread, so the CPU seconds this thread spends
    in the epoch are the stages' (the wds fetch thread's storage CPU is another thread's, so storage is
    left out of the sum; its wait costs this thread no CPU). Within 10%, and never above it."""
    cfg = LoaderConfig(data=str(datasets["png"]), split="train", batch_size=256, train=True, workers=0)
    loader = make_loader(loader_name, cfg)
    try:
        _epoch(loader, 0)
        _wall, cpu, stages = _epoch(loader, 1)
    finally:
        loader.close()
    here = sum(seconds for stage, seconds in stages["cpu"].items() if stage != "storage")
    assert 0.9 * cpu <= here <= 1.02 * cpu, (cpu, stages)
    assert stages["cpu"]["queue"] == stages["wall"]["queue"] == 0, "no hand-off without workers"


def test_the_baselines_worker_processes_send_their_stage_seconds(datasets: dict[str, Path]) -> None:
    """Two DataLoader workers: their per-sample decode and augment seconds arrive with the batches and
    are merged; the consumer counts unpickling as queue; storage is reported, and zero, per epoch."""
    cfg = LoaderConfig(data=str(datasets["raw"]), split="train", batch_size=256, train=True, workers=2)
    loader = make_loader("torchvision", cfg)
    try:
        wall, _cpu, stages = _epoch(loader, 0)
    finally:
        loader.close()
    assert set(stages["wall"]) == set(STAGES)
    assert stages["wall"]["storage"] == stages["cpu"]["storage"] == 0
    assert stages["wall"]["decode"] > 0 and stages["wall"]["augment"] > 0 and stages["wall"]["queue"] > 0
    # two workers ran side by side: their stage seconds may exceed the epoch's wall time, never twice it
    # (plus the consumer's own transfer and queue, which overlap with them)
    assert sum(stages["wall"][s] for s in READER_STAGES) <= 2 * wall


def test_the_tensor_loaders_prep_thread_reports_augment_and_queue(datasets: dict[str, Path]) -> None:
    """The prep thread's batches are augment (inside the epoch's wall time: one thread, --workers 1);
    the split is resident, so the stages an epoch does not have are reported as zero, not left out."""
    cfg = LoaderConfig(data=str(datasets["raw"]), split="train", batch_size=256, train=True, workers=1)
    loader = make_loader("tensor", cfg)
    try:
        wall, _cpu, stages = _epoch(loader, 0)
    finally:
        loader.close()
    assert set(stages["wall"]) == set(STAGES)
    assert stages["wall"]["augment"] > 0 and stages["wall"]["augment"] <= wall
    for stage in ("storage", "decode", "transfer"):  # resident: nothing read, decoded or copied per epoch
        assert stages["wall"][stage] == stages["cpu"][stage] == 0


# -- verdicts through train.py ----------------------------------------------------------------------
def _verdict(out: Path, *args: str) -> dict:
    common = ["--epochs", "1", "--device", "cpu", "--arch", "small", "--batch-size", "64"]
    assert train.main([*common, *args, "--out", str(out)]) == 0
    return json.loads((out / "run.json").read_text())["epochs"][0]["train"]


def test_a_remote_dataset_on_the_home_link_is_bound_by_storage(
    datasets: dict[str, Path], tmp_path: Path, s3_env, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """raw shards (3 KB an image) over the home preset (12.5 MB/s): ~4,000 img/s at most, against a
    decode and augment of ~10-30 us an image and an emulated accelerator at 100,000 img/s: the reader
    waits on the link most of the time."""
    from bench.datasets import upload
    from feedrate.network import preset
    from rig.netproxy import NetProxy

    url = f"s3://{bucket}/raw"
    upload(datasets["raw"], url)
    with NetProxy(s3_env.endpoint, link=preset("home"), seed=3) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        record = _verdict(
            tmp_path / "home", "--loader", "wds", "--data", url, "--net", "home", "--workers", "1",
            "--emulate", "100000", "--max-batches", "20",
        )  # fmt: skip
    assert record["bound_by"] == "storage", record
    assert record["stages"]["storage"] == max(record["stages"].values())


def test_the_baseline_on_a_fast_accelerator_is_bound_by_augment(
    datasets: dict[str, Path], tmp_path: Path
) -> None:
    """The torchvision baseline (png dataset named; the baseline reads the CIFAR python batches every
    dataset root keeps, so its pixels are raw whatever the shards' encoding) at an emulated 100,000
    img/s: data-bound. Measured here (tests/stage_cost.py, the stage table): building the PIL image
    (`decode`) costs ~30 us an image, the per-sample transform chain -- RandomCrop with padding,
    RandomHorizontalFlip, ToTensor, Normalize, each a Python call on one 32x32 image -- and the collate
    ~200-250 us: augment holds ~85% of the reader time."""
    record = _verdict(
        tmp_path / "base", "--loader", "torchvision", "--data", str(datasets["png"]), "--workers", "2",
        "--emulate", "100000", "--max-batches", "30",
    )  # fmt: skip
    assert record["bound_by"] == "augment", record
    assert record["stages"]["augment"] > record["stages"]["decode"] > 0 and record["stages"]["storage"] == 0


def test_a_slow_accelerator_is_bound_by_compute(datasets: dict[str, Path], tmp_path: Path) -> None:
    """At an emulated 200 img/s a batch of 64 takes 0.32 s: the readers (thousands of img/s) are always
    ahead, and the data wait is under 5% of the step time however the stages split."""
    record = _verdict(
        tmp_path / "slow", "--loader", "wds", "--data", str(datasets["raw"]), "--workers", "1",
        "--emulate", "200", "--max-batches", "6",
    )  # fmt: skip
    assert record["bound_by"] == "compute", record
    assert set(record["stages"]) == set(STAGES)


# -- torchrun ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("loader", ["wds", "torchvision"])
def test_stages_are_summed_over_ranks_and_kept_per_rank(
    loader: str, datasets: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = quick_args(datasets["raw"], out, loader, "--epochs", "1", "--max-batches", "8")
    proc = torchrun(*args)
    _stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr
    doc = json.loads((out / "run.json").read_text())
    for phase in ("train", "val"):
        record = doc["epochs"][0][phase]
        ranks = record["ranks"]
        assert len(ranks) == 2
        for kind, key in (("wall", "stages"), ("cpu", "stages_cpu")):
            assert set(record[key]) == set(STAGES), (phase, kind)
            for stage in STAGES:
                assert record[key][stage] == pytest.approx(sum(r[key][stage] for r in ranks), abs=1e-9)
        assert all(r["stages"]["decode"] > 0 and "bound_by" in r for r in ranks), ranks
        assert record["what_if"]["readers"] == 2  # workers 0: one reader a rank
