"""The stage contract (loaders.stagetimes), the per-epoch stages, verdict and what-if figures
(training.stages), run.json's stage fields end to end, and the harness-cost fixture's path."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import train
from feedrate.errors import FeedrateError
from loaders.baseline import TorchvisionLoader
from loaders.stagetimes import STAGES, StageTimes, stage_times, validate
from tests.harness_cost import RepeatBatch, run_once
from training import stages
from training.runinfo import phase
from training.timing import Clock, EpochStats


def stats(loading: float, compute: float, samples: int = 1000, snap: dict | None = None) -> EpochStats:
    """An epoch whose first batch took 0.2 s (0.1 s of it the step), so its steady wait and step are
    `loading` - 0.1 and `compute` - 0.1."""
    return EpochStats(0.0, 10, samples, loading, loading + compute, compute, 0.2, 0.1, snap)


# -- the contract ------------------------------------------------------------------------------------


def test_stage_times_accumulate_over_threads_and_merge_a_workers_snapshot() -> None:
    counter = StageTimes()

    def reader() -> None:
        for _ in range(1000):
            counter.add("decode", 0.001, 0.0005)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with counter.timed("storage"):
        time.sleep(0.01)
    counter.merge({"wall": {"augment": 2.0}, "cpu": {"augment": 1.5}})
    snap = counter.snapshot()
    assert snap["wall"]["decode"] == pytest.approx(4.0) and snap["cpu"]["decode"] == pytest.approx(2.0)
    assert snap["wall"]["storage"] > 0 and snap["cpu"]["storage"] >= 0
    assert snap["wall"]["augment"] == 2.0 and snap["cpu"]["augment"] == 1.5
    assert "queue" not in snap["wall"]  # never counted: not separable, not zero
    snap["wall"]["decode"] = 0.0
    assert counter.snapshot()["wall"]["decode"] == pytest.approx(4.0)  # a copy


def test_the_contract_refuses_unknown_stages_and_bad_seconds() -> None:
    with pytest.raises(FeedrateError, match=r"unknown stage 'resize'; accepted: storage, decode, augment"):
        StageTimes().add("resize", 1.0, 1.0)
    with pytest.raises(FeedrateError, match=r"stage decode: wall -1.0 and cpu 0.0 must be finite"):
        StageTimes().add("decode", -1.0, 0.0)
    for bad, message in (
        ([1, 2], r"must be a dict with keys wall, cpu"),
        ({"cpu": {}}, r"must be a dict with keys wall, cpu"),
        ({"wall": {"decode": float("nan")}}, r"wall seconds of decode = nan"),
        ({"wall": {"decode": "1"}}, r"wall seconds of decode = '1'"),
        ({"wall": {"gpu": 1.0}}, r"unknown stage 'gpu'"),
    ):
        with pytest.raises(FeedrateError, match=message):
            validate(bad, "X.stage_times()")


class Reporting:
    """A loader of `batches` batches whose readers spend `per_batch` seconds per stage per batch."""

    def __init__(self, batches: int, per_batch: dict[str, float] | None) -> None:
        self.batches, self.per_batch, self.counter = batches, per_batch, StageTimes()
        self.counter.add("decode", 100.0, 90.0)  # work done before the epoch (building, an earlier one)

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(self.batches):
            for stage, seconds in (self.per_batch or {}).items():
                self.counter.add(stage, seconds, seconds / 2)
            yield torch.zeros(4, 3, 2, 2), torch.zeros(4, dtype=torch.int64)

    def stage_times(self) -> dict | None:
        return None if self.per_batch is None else self.counter.snapshot()


def test_an_epochs_stages_are_the_difference_of_the_cumulative_counters() -> None:
    loader = Reporting(5, {"decode": 0.5, "storage": 0.25})
    epoch = train.run_epoch(loader, 5, lambda x, y: None, Clock(), "t", bar=False)
    assert epoch.stages == {
        "wall": {"storage": 1.25, "decode": 2.5},
        "cpu": {"storage": 0.625, "decode": 1.25},
    }
    again = train.run_epoch(loader, 5, lambda x, y: None, Clock(), "t", bar=False)
    assert again.stages == epoch.stages  # the second epoch counts only its own
    assert train.run_epoch(Reporting(3, None), 3, lambda x, y: None, Clock(), "t", bar=False).stages is None
    assert stage_times(RepeatBatch(1)) is None  # no method: no stages


def test_between_and_summed() -> None:
    before = {"wall": {"decode": 1.0}, "cpu": {"decode": 0.5}}
    after = {"wall": {"decode": 3.0, "queue": 0.5}, "cpu": {"decode": 1.5}}
    assert stages.between(before, after) == {"wall": {"decode": 2.0, "queue": 0.5}, "cpu": {"decode": 1.0}}
    assert stages.between(None, after) is None and stages.between(before, None) is None
    with pytest.raises(FeedrateError, match=r"went backwards: wall decode 3.000000 -> 1.000000 s"):
        stages.between(after, before)
    two = stages.summed([after, None, {"wall": {"storage": 1.0}, "cpu": {"storage": 0.25}}])
    assert two == {
        "wall": {"storage": 1.0, "decode": 3.0, "queue": 0.5},
        "cpu": {"storage": 0.25, "decode": 1.5},
    }
    assert list(two["wall"]) == [s for s in STAGES if s in two["wall"]]  # in the path's order
    assert stages.summed([None, None]) is None


# -- the verdict -------------------------------------------------------------------------------------


def test_verdict_storage_decode_and_compute() -> None:
    storage_bound = {"storage": 6.0, "decode": 2.0, "augment": 1.0, "transfer": 0.5, "queue": 0.5}
    assert stages.verdict(storage_bound, wait_s=3.0, step_s=10.0) == ("storage", 0.6)
    decode_bound = {"storage": 0.5, "decode": 6.2, "augment": 2.3, "queue": 1.0}
    assert stages.verdict(decode_bound, wait_s=1.0, step_s=10.0) == ("decode", pytest.approx(0.62))
    # The wait below 5% of the step time: compute, whatever the stages say, and with no stages at all.
    assert stages.verdict(decode_bound, wait_s=0.49, step_s=10.0) == ("compute", pytest.approx(0.049))
    assert stages.verdict(None, wait_s=0.2, step_s=10.0) == ("compute", pytest.approx(0.02))
    # Data-bound without stages, or with stages that add up to nothing: no verdict.
    assert stages.verdict(None, wait_s=0.5, step_s=10.0) == (None, None)
    assert stages.verdict({"decode": 0.0}, wait_s=0.5, step_s=10.0) == (None, None)
    # A tie goes to the stage earlier in the path.
    assert stages.verdict({"augment": 1.0, "decode": 1.0}, 5.0, 1.0) == ("decode", 0.5)


def test_the_verdict_leaves_the_first_batch_out() -> None:
    # 1.1 s blocked, of which the first fetch took 0.1 s: 1.0 s over a steady 20 s of steps is 5%.
    assert stages.steady(stats(1.1, 20.1)) == (pytest.approx(1.0), pytest.approx(20.0))
    assert phase([stats(1.05, 20.1)], (None, None))["bound_by"] == "compute"
    assert "bound_by" not in phase([stats(1.2, 20.1)], (None, None))  # data-bound, no stages


# -- the what-if figures -----------------------------------------------------------------------------


def test_what_if_arithmetic_on_constructed_numbers() -> None:
    # 1,000 images; 2 readers spend 4 s (storage 2, decode 1.5, augment 0.5) side by side: 2 s elapsed;
    # the consumer spends 0.5 s (transfer 0.3, queue 0.2).
    wall = {"storage": 2.0, "decode": 1.5, "augment": 0.5, "transfer": 0.3, "queue": 0.2}
    w = stages.what_if(wall, samples=1000, readers=2)
    assert w["feed_img_per_s"] == pytest.approx(1000 / 2.0)
    assert w["cached"]["img_per_s"] == pytest.approx(1000 / 1.0)  # (1.5 + 0.5) / 2
    assert w["twice_readers"]["img_per_s"] == pytest.approx(1000 / 1.0)  # 4 / 4
    # p = 2 ms, c = 0.5 ms per image: AU >= 90% needs 1/A >= 1.8 ms and 1/A >= 4.5 ms.
    assert w["au90_accelerator"]["img_per_s"] == pytest.approx(1 / 0.0045)
    assert w["not_separable"] == [] and w["readers"] == 2
    assert all(w[k]["assumption"] for k in ("cached", "twice_readers", "au90_accelerator")) and w["model"]
    # The consumer is the bottleneck: more readers or a cache change nothing.
    slow_hand_off = stages.what_if({"decode": 1.0, "queue": 4.0}, samples=1000, readers=2)
    assert (
        slow_hand_off["feed_img_per_s"] == slow_hand_off["twice_readers"]["img_per_s"] == pytest.approx(250)
    )
    assert slow_hand_off["not_separable"] == ["storage", "augment", "transfer"]
    assert stages.what_if({"storage": 1.0}, 1000, 1)["cached"]["img_per_s"] is None  # nothing left to time


def test_stages_a_loader_marks_as_the_consumers_are_not_shared_out_over_readers() -> None:
    # DALI's CPU path: the consumer waits 1.5 s on the pipeline (decode) and augments for 0.5 s itself.
    wall = {"decode": 1.5, "augment": 0.5, "transfer": 0.0}
    marked = stages.what_if(wall, samples=1000, readers=2, consumer=dict(wall))
    assert marked["feed_img_per_s"] == pytest.approx(1000 / 2.0)  # not (1.5 + 0.5) / 2 readers
    assert marked["twice_readers"]["img_per_s"] == pytest.approx(1000 / 2.0)  # more readers: no help
    assert marked["consumer_stages"] == ["augment", "decode"]
    unmarked = stages.what_if(wall, samples=1000, readers=2)
    assert unmarked["feed_img_per_s"] == pytest.approx(1000 / 1.0) and unmarked["consumer_stages"] == []
    # the counter records the marking, and an epoch's difference keeps it
    counter = StageTimes()
    counter.add("decode", 1.0, 0.5, consumer=True)
    counter.add("augment", 2.0, 2.0)
    before = counter.snapshot()
    counter.add("decode", 0.5, 0.1, consumer=True)
    epoch = stages.between(before, counter.snapshot())
    assert epoch is not None and epoch["consumer"] == {"decode": 0.5} and epoch["wall"]["augment"] == 0.0
    assert validate(counter.snapshot(), "t")["consumer"] == {"decode": 1.5}


def test_under_ddp_the_job_sums_the_ranks_and_each_rank_keeps_its_own() -> None:
    a = stats(5.0, 2.0, 1000, {"wall": {"decode": 3.0, "queue": 1.0}, "cpu": {"decode": 2.0}})
    b = stats(5.0, 2.0, 1000, {"wall": {"decode": 1.0, "queue": 1.5}, "cpu": {"decode": 1.0}})
    record = phase([a, b], (None, None), workers=2)
    assert record["stages"] == {"decode": 4.0, "queue": 2.5} and record["stages_cpu"] == {"decode": 3.0}
    assert record["bound_by"] == "decode" and record["bound_share"] == pytest.approx(4 / 6.5)
    assert record["what_if"]["readers"] == 4
    # 2,000 images; 4 readers: 1 s of decoding elapsed; 2 consumers: 1.25 s of queue: 1,600 img/s.
    assert record["what_if"]["feed_img_per_s"] == pytest.approx(1600)
    # Per accelerator and image: p = 1 ms, c = 1.25 ms; AU >= 90% needs 1/A >= 9c = 11.25 ms.
    assert record["what_if"]["au90_accelerator"]["img_per_s"] == pytest.approx(1 / 0.01125)
    assert [r["bound_by"] for r in record["ranks"]] == ["decode", "queue"]
    assert record["ranks"][0]["stages"] == {"decode": 3.0, "queue": 1.0}
    assert "what_if" not in record["ranks"][0]


# -- end to end --------------------------------------------------------------------------------------


def _run(data: Path, out: Path) -> dict:
    args = ["--loader", "torchvision", "--data", str(data), "--epochs", "1", "--batch-size", "64"]
    args += ["--workers", "0", "--device", "cpu", "--emulate", "1000000", "--max-batches", "3"]
    assert train.main([*args, "--out", str(out)]) == 0
    return json.loads((out / "run.json").read_text())


def test_run_json_carries_stages_and_bound_by_when_the_loader_reports_them(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a loader reporting no stages (the contract's None; the torchvision loader reports its own since
    # it was instrumented, so it is told not to here)
    with monkeypatch.context() as m:
        m.setattr(TorchvisionLoader, "stage_times", lambda self: None)
        plain = _run(tiny_dataset, tmp_path / "plain")["epochs"][0]
    for record in (plain["train"], plain["val"]):
        assert "stages" not in record and "stages_cpu" not in record and "what_if" not in record
        assert record.get("bound_by") in (None, "compute")  # compute needs no stages; a stage would

    made: list[StageTimes] = []

    def reported(self: TorchvisionLoader) -> dict:
        if not hasattr(self, "_test_stages"):
            self._test_stages = StageTimes()
            made.append(self._test_stages)
        self._test_stages.add("decode", 0.5, 0.25)  # every reading: 0.5 s more decoding
        self._test_stages.add("storage", 0.1, 0.0)
        return self._test_stages.snapshot()

    monkeypatch.setattr(TorchvisionLoader, "stage_times", reported, raising=False)
    doc = _run(tiny_dataset, tmp_path / "staged")
    for record in (doc["epochs"][0]["train"], doc["epochs"][0]["val"]):
        assert record["stages"] == {"storage": pytest.approx(0.1), "decode": pytest.approx(0.5)}
        assert record["stages_cpu"] == {"storage": 0.0, "decode": pytest.approx(0.25)}
        assert record["bound_by"] in ("decode", "compute")
        if record["bound_by"] == "decode":
            assert record["bound_share"] == pytest.approx(0.5 / 0.6)
        assert record["what_if"]["readers"] == 1 and record["what_if"]["feed_img_per_s"] > 0
    assert len(made) == 2  # the train and the test loader each counted their own


def test_the_harness_cost_fixture_runs_train_run_epoch_and_writes_its_rows(tmp_path: Path) -> None:
    # A benchmark path (python -m tests.harness_cost): only that it runs, never how fast.
    for rate in (None, 1_000_000.0):
        epoch = run_once(rate, 5, tmp_path, batch_size=8)
        assert epoch.batches == 5 and epoch.samples == 40 and epoch.stages is None
        rows = (tmp_path / "train.csv").read_text().splitlines()
        assert rows[0] == "type,epoch,start,loading,duration,value1,value2"
        assert [r.split(",")[5] for r in rows[1:]] == ["1", "2", "3", "4", "5"]
