"""The DALI loader's next-epoch pipeline, built ahead in a background thread while an epoch ends
(loaders.dali_pipe: `_Ahead`), through DALI's real CPU pipeline on real shards.

What it must not change: every epoch's batches (ids, labels, pixels) are those of a loader that builds
each pipeline when its epoch starts (`_ahead_at = None`); a state taken at an epoch boundary or early
in a pipeline built ahead restores exactly. What it must do: use the pipeline built ahead when the next
iteration is the epoch after, discard it (joined, released) otherwise, raise its build's error in the
consumer as the build itself would, and leave no thread or pipeline behind.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

from loaders.dali_pipe import DaliError, DaliLoader
from loaders.stagetimes import stage_times
from tests.helpers import needs_dali
from tests.test_dali_state import BATCH, Batches, N, dali, id_of, ids, same, take, write_dataset

EPOCHS = range(1, 6)


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("dali-ahead"))


def in_place(root: Path, **kw: object) -> DaliLoader:
    """A loader that builds each epoch's pipeline when the epoch starts (the reference)."""
    loader = dali(root, **kw)
    loader._ahead_at = None
    return loader


def foreground_builds(loader: DaliLoader) -> list[int]:
    """The epochs whose pipelines `loader` builds on the consumer's thread from now on."""
    built: list[int] = []
    build = loader._build

    def counted(plan) -> None:  # type: ignore[no-untyped-def]
        built.append(plan.epoch)
        build(plan)

    loader._build = counted  # type: ignore[method-assign]
    return built


def ahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("feedrate-dali-ahead")]


def dali_threads() -> int:
    """This process's native threads that DALI's pipelines name (each live pipeline keeps its own
    executor and prefetch threads): a count of the threads other tests leave winding down would not
    do, but these only fall when a pipeline ends."""
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            names.append(Path(f"/proc/self/task/{task}/comm").read_text().strip())
        except OSError:
            continue  # a thread that ended meanwhile
    return sum(n.startswith("[DALI]") or n == "PrefetchWorker" for n in names)


@needs_dali
@pytest.mark.parametrize(
    ("world", "train", "at"), [(1, True, None), (2, True, None), (1, False, None), (1, True, 0)]
)
def test_epochs_built_ahead_are_the_epochs_built_in_place(
    raw: Path, world: int, train: bool, at: int | None
) -> None:
    """Several epochs, each rank's: the same ids, labels and pixels; and after the first, every
    pipeline came from the build ahead (`at` = 0: begun once the epoch's last batch is read, the
    ended pipeline released by the build's thread). Each training epoch's order differs from the one
    before, so a pipeline built ahead with another epoch's seeds would not pass."""
    table = id_of(raw)
    orders: list[list[list[int]]] = []  # per rank, per epoch
    for rank in range(world):
        kw = {"rank": rank, "world_size": world, "train": train}
        with dali(raw, **kw) as ahead, in_place(raw, **kw) as reference:
            if at is not None:
                ahead._ahead_at = at
            built = foreground_builds(ahead)
            got: list[Batches] = [take(ahead, epoch=e) for e in EPOCHS]
            want: list[Batches] = [take(reference, epoch=e) for e in EPOCHS]
            assert built == [EPOCHS[0]]  # the loader was made with epoch 0's; every later one ahead
            for epoch, a, b in zip(EPOCHS, got, want, strict=True):
                assert same(a, b), epoch
            orders.append([ids(b, table) for b in want])
    for epoch in range(len(EPOCHS)):  # the ranks' parts: the split, once
        assert sorted(i for rank in orders for i in rank[epoch]) == list(range(N))
    if train:
        assert all(x != y for x, y in itertools.pairwise(orders[0]))


@needs_dali
@pytest.mark.parametrize(
    "case", ["another epoch", "the same epoch again", "a state loaded", "abandoned early", "abandoned late"]
)
def test_a_pipeline_built_ahead_for_another_iteration_is_discarded(raw: Path, case: str) -> None:
    """Whatever comes after an epoch read to its end, the batches are the reference's, and a
    pipeline built ahead that does not serve it is joined and released on the spot."""
    with dali(raw) as loader, in_place(raw) as reference:
        whole = take(loader, epoch=1)
        assert loader._ahead is not None and loader._ahead.plan.epoch == 2  # built as epoch 1 ended
        if case == "another epoch":
            loader.set_epoch(4)
            assert loader._ahead is None and ahead_threads() == []
            assert same(take(loader, epoch=None), take(reference, epoch=4))
        elif case == "the same epoch again":
            assert same(take(loader, epoch=None), whole) and same(whole, take(reference, epoch=1))
        elif case == "a state loaded":
            full = take(reference, epoch=2)
            take(reference, 3, epoch=2)
            state = reference.state_dict()  # 3 batches into epoch 2: a pending resume plan
            loader.load_state_dict(state)
            assert loader._ahead is None and ahead_threads() == []
            loader.set_epoch(2)
            assert same(take(loader, epoch=None), full[3:])
        else:  # epoch 2 abandoned after 2 batches; epoch 3 is whole
            if case == "abandoned early":
                loader._ahead_at = 2 * BATCH  # nothing built ahead 2 batches in
            assert same(take(loader, 2, epoch=2), take(reference, 2, epoch=2))
            built = foreground_builds(loader)
            assert (loader._ahead is None) == (case == "abandoned early")
            assert same(take(loader, epoch=3), take(reference, epoch=3))
            assert built == ([3] if case == "abandoned early" else [])
        assert same(take(loader, epoch=5), take(reference, epoch=5))


@needs_dali
def test_no_pipeline_is_built_ahead_past_the_last_epoch_said(raw: Path) -> None:
    """train.py numbers its epochs 1..--epochs and says the last (LoaderConfig.last_epoch): epoch 1 of 2
    builds epoch 2's pipeline ahead, epoch 2 builds nothing, while a loader that is not told keeps
    building (the test above)."""
    with dali(raw, last_epoch=2) as loader, in_place(raw) as reference:
        assert same(take(loader, epoch=1), take(reference, epoch=1))
        assert loader._ahead is not None and loader._ahead.plan.epoch == 2
        assert same(take(loader, epoch=2), take(reference, epoch=2))
        assert loader._ahead is None and ahead_threads() == []


@needs_dali
def test_no_thread_or_pipeline_outlives_the_loader(raw: Path) -> None:
    with dali(raw) as warm:  # DALI's process-wide threads, started once
        take(warm, epoch=1)
    time.sleep(0.2)
    before = dali_threads()
    loader = dali(raw)
    assert dali_threads() > before  # the counted threads are the pipelines'
    for epoch in (1, 2, 3, 7, 8):  # built ahead and used, then discarded (7 is not 4), then used
        take(loader, epoch=epoch)
        assert len(ahead_threads()) <= 1
    take(loader, 2, epoch=9)  # an abandoned epoch
    take(loader, epoch=10)  # read to its end: epoch 11's pipeline is built ahead, and never used
    assert loader._ahead is not None
    loader.close()
    assert loader._ahead is None and loader._pipe is None and ahead_threads() == []
    time.sleep(0.2)
    assert dali_threads() <= before  # no pipeline of this loader's left (others' may end meanwhile)


@needs_dali
def test_an_error_of_the_build_ahead_is_the_consumers_as_the_build_would_raise_it(raw: Path) -> None:
    """The loader's own index file of a shard damaged after its first pipeline was built: the build of
    the next epoch fails -- in the background, and the next iteration raises its one-line DaliError,
    word for word the error of a loader that builds in place."""
    messages = []
    for loader in (dali(raw), in_place(raw)):
        with loader:
            index = sorted((loader._index_dir / "split").glob("*.idx"))[1]
            index.write_text("v1.2 3\nnot an index line\n")
            assert sum(len(y) for _, y in take(loader, epoch=0)) == N  # the pipeline built before
            with pytest.raises(DaliError) as caught:
                take(loader, epoch=1)
            text = str(caught.value)
            assert "\n" not in text and text.startswith("DALI cannot read the train shards of")
            messages.append(text.replace(str(loader._index_dir), "INDEX_DIR"))
    assert messages[0] == messages[1]


@needs_dali
@pytest.mark.parametrize("k", [0, 1, 2])
def test_a_state_early_in_a_pipeline_built_ahead_restores_exactly(raw: Path, k: int) -> None:
    """k batches into epoch 2, whose pipeline was built ahead (k = 0: right at the boundary, the
    pipeline built and filling): a fresh loader given the state reads the rest, then epoch 3, as the
    uninterrupted loader does."""
    with dali(raw) as loader:
        take(loader, epoch=1)
        built = foreground_builds(loader)
        head = take(loader, k, epoch=2) if k else []
        if not k:
            loader.set_epoch(2)
        state = loader.state_dict()
        assert state["count"] == k * BATCH and (state["exact"]["dali"] is None) == (k == 0)
        rest = take(loader, epoch=None) if not k else _rest_after(loader, k)
        later = take(loader, epoch=3)
        assert built == ([] if not k else [2])  # k > 0: the rest needs a pipeline of its own
    with dali(raw) as fresh:
        fresh.load_state_dict(state)
        fresh.set_epoch(2)
        assert same(take(fresh, epoch=None), rest)
        assert same(take(fresh, epoch=3), later)
    assert len(head) + len(rest) == -(-N // BATCH)


def _rest_after(loader: DaliLoader, k: int) -> Batches:
    """Epoch 2 after its first k batches, read again from its start (DALI cannot rewind: a new pipeline
    of the same seeds), so that the state's own pipeline is left as it was."""
    return take(loader, epoch=2)[k:]


@needs_dali
@pytest.mark.parametrize("at", [None, 0])
def test_the_ended_pipeline_is_released_by_the_build_thread(raw: Path, at: int | None) -> None:
    """The pipeline of an epoch read to its end is destroyed on the build thread, not on the
    consumer's path (DALI joins its threads as it goes: tens of ms); `at` = 0: handed over as the
    build starts, else (the default) once the epoch ends, the build already under way."""
    with dali(raw) as loader:
        if at is not None:
            loader._ahead_at = at
        loader.set_epoch(1)
        batches = iter(loader)
        next(batches)  # epoch 1's pipeline exists from here
        where: list[str] = []
        weakref.finalize(loader._pipe, lambda: where.append(threading.current_thread().name))
        for _ in batches:
            pass
        assert loader._ahead is not None
        loader._ahead.join()  # the releases handed over are done when it ends
        assert where == ["feedrate-dali-ahead-2"]
        with in_place(raw) as reference:
            assert same(take(loader, epoch=2), take(reference, epoch=2))


@needs_dali
def test_a_wait_for_the_build_is_counted_once(raw: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The consumer waiting for a build that has not finished: that wait is the consumer's decode
    time, and the build thread's own wall is not added again over it. The build is held up by a
    sleep (no CPU), started as epoch 1's last batch is read, and epoch 2 begins at once: its decode
    wall cannot exceed the wall the consumer spent in it plus what the build did before it (nothing
    counted twice would add the whole sleep)."""
    hold = 1.0
    with dali(raw) as loader:
        loader._ahead_at = 0  # the build starts at the end of the epoch
        make = loader._make

        def slow(plan, start: bool = False):  # type: ignore[no-untyped-def]
            if start:
                time.sleep(hold)
            return make(plan, start)

        monkeypatch.setattr(loader, "_make", slow)
        take(loader, epoch=1)
        ahead = loader._ahead
        assert ahead is not None and ahead._thread.is_alive()
        before = stage_times(loader)
        t0 = time.perf_counter()
        take(loader, epoch=2)
        spent = time.perf_counter() - t0
        after = stage_times(loader)
    assert before is not None and after is not None
    assert ahead.wall >= hold
    assert after["wall"]["decode"] - before["wall"]["decode"] < spent + hold / 2


@needs_dali
def test_the_build_ahead_counts_under_decode_once(raw: Path) -> None:
    """The background build's wall counts under decode but off the consumer's path; no stage counts
    more CPU than the process spent (its thread's CPU is left out of the consumer's overlapping waits),
    and decode's CPU is about the in-place reference's: the same builds and reads, counted once, and
    one build more (epoch 6's, never read; 1.2x here, 2x with the thread's CPU counted twice). Each
    loader is read on its own, CPU not wall, with a wide margin: the machine may be busy."""
    cpu0 = time.process_time()
    with dali(raw) as ahead:
        for epoch in EPOCHS:
            take(ahead, epoch=epoch)
    with in_place(raw) as reference:
        for epoch in EPOCHS:
            take(reference, epoch=epoch)
    spent = time.process_time() - cpu0
    a, b = stage_times(ahead), stage_times(reference)
    assert a is not None and b is not None
    assert a["wall"]["decode"] > a["consumer"]["decode"]  # the builds ahead: a reader's seconds
    assert b["wall"]["decode"] == pytest.approx(b["consumer"]["decode"])
    assert sum(a["cpu"].values()) + sum(b["cpu"].values()) <= spent
    assert np.isfinite(list(a["cpu"].values())).all()
    assert a["cpu"]["decode"] <= 1.5 * b["cpu"]["decode"] + 0.02


@needs_dali
def test_a_loader_dropped_without_close_leaves_no_build_thread(raw: Path) -> None:
    """A loader nobody closes (an exception escaping the training loop, a test that forgets): its build
    thread must end once its build is done, not wait for a pipeline to release. A thread that waited
    kept the loader and its pipelines alive, and the whole test suite ran out of memory."""
    import gc

    loader = dali(raw)
    take(loader, epoch=1)  # read to its end: epoch 2's pipeline is built ahead
    assert loader._ahead is not None
    thread = loader._ahead._thread
    ref = weakref.ref(loader)
    del loader
    thread.join(30)
    assert not thread.is_alive(), "the build thread outlived its build"
    gc.collect()
    assert ref() is None, "something still holds the loader"
