"""The DALI loader's stage times (loaders.dali_pipe, the contract of loaders.stagetimes) through DALI's real
CPU pipeline on real shards, and what train.py makes of them. No timing is asserted: only which stages
are reported, that they are valid and that they grow as the loader works.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import train
from loaders import LoaderConfig, make_loader
from loaders.stagetimes import Snapshot, stage_times
from shardgen import ShardgenConfig, build
from tests.helpers import needs_dali
from training.stages import VERDICTS

CPU_STAGES = {"decode", "augment", "transfer"}  # storage is merged into decode; queue is inside it too


@pytest.fixture(scope="module")
def raw_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic raw dataset: 150 train / 40 test samples in shards of 50."""
    root = tmp_path_factory.mktemp("dali-stages") / "ds"
    build(
        ShardgenConfig(
            dest=str(root),
            source="synthetic",
            fmt="raw",
            shard_size=50,
            synthetic_train=150,
            synthetic_test=40,
            allow_download=False,
        )
    )
    return root


def reading(loader: object) -> Snapshot:
    snapshot = stage_times(loader)  # validated against the contract, or a FeedrateError
    assert snapshot is not None
    return snapshot


def grew(before: Snapshot, after: Snapshot, stages: set[str]) -> list[str]:
    """`kind stage` for every stage whose wall or CPU seconds did not increase."""
    return [
        f"{kind} {stage}"
        for kind in ("wall", "cpu")
        for stage in sorted(stages)
        if not after[kind][stage] > before[kind].get(stage, 0.0)
    ]


@needs_dali
@pytest.mark.parametrize("split", ["train", "test"])
def test_cpu_stages_are_decode_augment_transfer_and_grow_every_epoch(raw_dataset: Path, split: str) -> None:
    cfg = LoaderConfig(data=str(raw_dataset), split=split, batch_size=16, train=split == "train", workers=1)
    loader = make_loader("dali", cfg)
    try:
        built = reading(loader)
        # building the pipeline reads the shards ahead (decode, storage merged in); no batch touched yet
        assert set(built["wall"]) == set(built["cpu"]) == {"decode"}
        last = built
        for epoch in (1, 2):
            loader.set_epoch(epoch)
            assert sum(len(y) for _, y in loader) == loader.samples
            now = reading(loader)
            assert set(now["wall"]) == set(now["cpu"]) == CPU_STAGES, epoch
            assert grew(last, now, CPU_STAGES) == [], epoch
            last = now
    finally:
        loader.close()


@needs_dali
def test_abandoned_epochs_are_counted_too(raw_dataset: Path) -> None:
    cfg = LoaderConfig(data=str(raw_dataset), split="train", batch_size=16, train=True)
    loader = make_loader("dali", cfg)
    try:
        for epoch, taken in ((0, 2), (1, 1)):  # each epoch stops early: the next builds a fresh pipeline
            before = reading(loader)
            loader.set_epoch(epoch)
            batches = iter(loader)
            for _ in range(taken):
                next(batches)
            del batches
            assert grew(before, reading(loader), CPU_STAGES) == [], epoch
    finally:
        loader.close()


@needs_dali
def test_train_py_places_the_wait_on_a_dali_stage(raw_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["--loader", "dali", "--data", str(raw_dataset), "--emulate", "100000", "--epochs", "1"]
    args += ["--batch-size", "16", "--max-batches", "6", "--workers", "2", "--device", "cpu"]
    assert train.main([*args, "--arch", "small", "--out", str(out)]) == 0
    doc = json.loads((out / "run.json").read_text())
    for phase in ("train", "val"):
        record = doc["epochs"][0][phase]
        assert set(record["stages"]) == set(record["stages_cpu"]) == CPU_STAGES, phase
        assert record["bound_by"] in VERDICTS, phase
        assert record["what_if"]["not_separable"] == ["storage", "queue"], phase


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@needs_dali
def test_gpu_stages_leave_the_augmentation_inside_decode(raw_dataset: Path) -> None:
    cfg = LoaderConfig(data=str(raw_dataset), split="train", batch_size=16, train=True, device="cuda")
    loader = make_loader("dali", cfg)
    try:
        before = reading(loader)
        assert sum(len(y) for _, y in loader) == loader.samples
        after = reading(loader)
        assert set(after["wall"]) == {"decode", "transfer"}
        assert grew(before, after, {"decode", "transfer"}) == []
    finally:
        loader.close()
