"""The tensor loader's CPU preparation: N threads (workers=N) preparing batches ahead, or the consumer's
own thread (workers=0); exactly once, by seed, in one order for every N, stopped on every exit."""

from __future__ import annotations

import _thread
import threading
import time
from collections import Counter

import pytest
import torch
from encoded import decode_identity

from feedrate.errors import FeedrateError
from loaders import LoaderConfig, make_loader
from loaders.resident import AHEAD, HELD, THREAD_NAME, Slot
from tests.helpers import fresh_process_output


def _threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_NAME) and t.is_alive()]


@pytest.fixture
def root(make_encoded_dataset) -> str:
    return str(make_encoded_dataset("raw", n_train=300, n_test=100, shard_size=100))


def _loader(root: str, batch_size: int = 32, train: bool = True, seed: int = 0, workers: int = 1):
    cfg = LoaderConfig(root, "train", batch_size=batch_size, train=train, seed=seed, workers=workers)
    return make_loader("tensor", cfg)


@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_every_epoch_exactly_once_and_the_threads_end_with_it(root: str, workers: int) -> None:
    loader = _loader(root, batch_size=64, workers=workers)
    orders = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        seen, sizes = [], []
        for images, labels in loader:
            assert len(_threads()) <= workers, "workers=0 prepares in the consumer's thread"
            index, decoded = decode_identity(images)
            assert decoded == labels.tolist(), "every image carries its own label"
            seen += index
            sizes.append(len(labels))
        assert sorted(seen) == list(range(300)) and sizes == [64, 64, 64, 64, 44]
        assert _threads() == [], "an epoch read to its end leaves no thread behind"
        orders.append(seen)
    assert orders[0] != orders[1] != orders[2]


@pytest.mark.parametrize("train", [True, False])
def test_batches_are_the_seeds_whatever_the_pace(root: str, train: bool) -> None:
    """The threads make the draws a synchronous loop would, whether the consumer is fast or slow."""
    fast = [(i.clone(), t.clone()) for i, t in _loader(root, train=train, seed=5, workers=2)]
    slow = []
    for images, labels in _loader(root, train=train, seed=5, workers=2):
        time.sleep(0.01)  # the threads run ahead while the step "computes"
        slow.append((images.clone(), labels.clone()))
    reference = _loader(root, train=train, seed=5)
    fill = reference._filler(reference.order())
    inline = []
    for k in range(len(reference)):
        slot = reference._new_slot()
        fill(slot, k)
        inline.append((slot.images[: slot.n], slot.labels[: slot.n]))
    assert len(fast) == len(slow) == len(inline) == 10
    for (a, x), (b, y), (c, z) in zip(fast, slow, inline, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
        assert torch.equal(x, y) and torch.equal(x, z)
    other = [i for i, _ in _loader(root, train=train, seed=6)]
    if train:
        assert not all(torch.equal(a, b) for (a, _), b in zip(fast, other, strict=True))


@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_buffers_are_reused_unless_a_batch_is_kept(
    root: str, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    loader = _loader(root, batch_size=20, workers=workers)  # 15 batches
    made = []
    new_slot = loader._new_slot

    def counted() -> Slot:
        made.append(1)
        return new_slot()

    monkeypatch.setattr(loader, "_new_slot", counted)
    seen = [i for images, _ in loader for i in decode_identity(images)[0]]
    assert sorted(seen) == list(range(300))
    pool = workers * AHEAD + HELD if workers else HELD + 1
    assert len(made) == pool, "batches nobody kept go back into the pool"
    made.clear()
    kept = list(loader)  # every batch kept: none may be overwritten
    views = [images[:3] for images, _ in loader]  # the same epoch again; views keep their buffers too
    arrays = [labels.numpy() for _, labels in loader]  # and so do numpy arrays over them
    assert len(made) >= 3 * (len(loader) - pool), "a kept buffer is replaced, not refilled"
    assert sorted(i for images, _ in kept for i in decode_identity(images)[0]) == list(range(300))
    for (images, labels), view in zip(kept, views, strict=True):
        assert decode_identity(images)[1] == labels.tolist()
        assert torch.equal(view, images[:3])
    assert [a.tolist() for a in arrays] == [labels.tolist() for _, labels in kept]


def _counting(loader, started: list[tuple[int, str]]):
    """A `_filler` that records (batch, thread name) as each fill starts."""
    make_fill = loader._filler

    def filler(order: torch.Tensor):
        fill = make_fill(order)

        def counted(slot: Slot, k: int) -> None:
            started.append((k, threading.current_thread().name))
            fill(slot, k)

        return counted

    return filler


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_each_thread_stays_at_most_AHEAD_batches_ahead(
    root: str, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    loader = _loader(root, batch_size=10, workers=workers)  # 30 batches
    started: list[tuple[int, str]] = []
    monkeypatch.setattr(loader, "_filler", _counting(loader, started))
    for taken, _ in enumerate(loader, start=1):
        time.sleep(0.01)  # an unbounded thread would prepare the whole epoch meanwhile
        for i in range(workers):
            mine = [k for k, _ in list(started) if k % workers == i]
            taken_mine = len(range(i, taken, workers))
            assert len(mine) <= taken_mine + AHEAD, (i, taken, mine)
    assert sorted(k for k, _ in started) == list(range(30)), "each batch is prepared once"
    for k, name in started:
        assert name == f"{THREAD_NAME}-{k % workers}", "batch k is thread k % N's"


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_close_and_abandoning_an_epoch_stop_the_threads(root: str, workers: int) -> None:
    loader = _loader(root, workers=workers)  # 10 batches
    it = iter(loader)
    next(it)
    assert len(_threads()) == workers
    del it  # an abandoned epoch (train.py's --max-batches)
    assert _threads() == []
    first = iter(loader)
    next(first)
    second = iter(loader)  # a new epoch while the old iterator is still alive: the old threads stop
    seen = [i for images, _ in second for i in decode_identity(images)[0]]
    assert sorted(seen) == list(range(300)) and _threads() == []
    del first
    it = iter(loader)
    next(it)
    assert len(_threads()) == workers
    loader.close()
    assert _threads() == []
    loader.close()  # twice is fine
    with pytest.raises(FeedrateError, match="was closed; make a new one"):
        next(iter(loader))


def test_no_more_threads_than_batches(root: str) -> None:
    loader = _loader(root, batch_size=150, workers=3)  # 2 batches: a third thread would have none
    it = iter(loader)
    next(it)
    assert len(_threads()) <= 2
    assert len(list(it)) == 1 and _threads() == []


def _failing(loader, at: int, error: BaseException | None = None, delay: float = 0.0, where=None):
    make_fill = loader._filler

    def filler(order: torch.Tensor):
        fill = make_fill(order)

        def fails(slot: Slot, k: int) -> None:
            if k == at:
                if where is not None:
                    where.append(threading.current_thread().name)
                if delay:
                    time.sleep(delay)
                if error is not None:
                    raise error
            fill(slot, k)

        return fails

    return filler


@pytest.mark.parametrize("workers", [0, 1])
def test_an_error_in_the_preparation_reaches_the_consumer(
    root: str, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    loader = _loader(root, workers=workers)
    monkeypatch.setattr(loader, "_filler", _failing(loader, at=2, error=ValueError("bad batch 2")))
    got = 0
    with pytest.raises(ValueError, match="bad batch 2"):
        for _ in loader:
            got += 1
    assert got == 2, "the batches before the failure arrive first"
    assert _threads() == []


@pytest.mark.parametrize("at", [1, 3])
def test_an_error_in_thread_1_reaches_the_consumer_in_order(
    root: str, monkeypatch: pytest.MonkeyPatch, at: int
) -> None:
    """Thread 1 of 2 fails on batch `at` (odd: its own); thread 0 goes on meanwhile, but the consumer
    gets every batch before `at` and then the error, and no thread is left."""
    loader = _loader(root, workers=2)
    where: list[str] = []
    monkeypatch.setattr(
        loader, "_filler", _failing(loader, at=at, error=ValueError("thread 1 broke"), where=where)
    )
    got = []
    with pytest.raises(ValueError, match="thread 1 broke"):
        for images, _ in loader:
            got.append(images.clone())
    assert where == [f"{THREAD_NAME}-1"]
    assert len(got) == at, "the batches before the failure arrive first"
    assert _threads() == []
    loader.set_epoch(0)
    monkeypatch.undo()
    again = [images for images, _ in loader]  # the same epoch, unbroken: the same first batches
    assert all(torch.equal(a, b) for a, b in zip(got, again, strict=False))


def test_a_slow_thread_keeps_the_order(root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Thread 0 is slow on batch 2 while thread 1 has batch 3 ready: the consumer waits for batch 2."""
    ref = [i for images, _ in _loader(root, workers=1) for i in decode_identity(images)[0]]
    loader = _loader(root, workers=2)
    monkeypatch.setattr(loader, "_filler", _failing(loader, at=2, delay=0.2))
    seen = [i for images, _ in loader for i in decode_identity(images)[0]]
    assert seen == ref


def test_each_fill_is_timed_once_as_augment_in_its_thread(root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """StageTimes.timed measures its own thread's CPU time, so each fill is timed in the thread doing it
    (never the consumer), once; the consumer times the hand-offs."""
    loader = _loader(root, workers=3)
    timed = loader._stages.timed
    calls: Counter[tuple[str, str]] = Counter()
    lock = threading.Lock()

    def spy(stage: str, consumer: bool = False):
        with lock:
            calls[(stage, threading.current_thread().name)] += 1
        return timed(stage, consumer)

    monkeypatch.setattr(loader._stages, "timed", spy)
    before = loader.stage_times()
    assert len(list(loader)) == 10
    after = loader.stage_times()
    augment = {name: n for (stage, name), n in calls.items() if stage == "augment"}
    assert augment == {f"{THREAD_NAME}-0": 4, f"{THREAD_NAME}-1": 3, f"{THREAD_NAME}-2": 3}
    queue = {name for (stage, name), n in calls.items() if stage == "queue"}
    assert queue <= {threading.current_thread().name}
    assert after["wall"]["augment"] > before["wall"]["augment"]
    assert "consumer" not in after, "threads run ahead: nothing is marked as the consumer's"


def test_workers_0_prepares_in_the_consumer_and_says_so(root: str) -> None:
    loader = _loader(root, workers=0)
    assert len(list(loader)) == 10 and _threads() == []
    stages = loader.stage_times()
    assert stages["consumer"]["augment"] == stages["wall"]["augment"] > 0
    assert stages["wall"]["queue"] == 0, "no hand-off between threads"


@pytest.mark.parametrize("workers", [1, 2])
def test_an_interrupt_while_waiting_stops_the_threads(
    root: str, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    """SIGINT (train.py turns SIGTERM into the same) while the consumer waits on a slow batch."""
    loader = _loader(root, workers=workers)
    monkeypatch.setattr(loader, "_filler", _failing(loader, at=1, delay=0.5))
    timer = threading.Timer(0.1, _thread.interrupt_main)
    with pytest.raises(KeyboardInterrupt):
        timer.start()
        for _ in loader:
            pass
    timer.join()
    assert _threads() == []
    loader.set_epoch(1)
    assert sorted(i for images, _ in loader for i in decode_identity(images)[0]) == list(range(300))


PROBE = """
import torch
from loaders.resident import Prefetch, Slot
torch.set_num_threads(2)  # nothing has run a parallel op in this thread yet
prefetch = Prefetch(6, lambda slot, k: None, lambda: Slot(torch.empty(1), torch.empty(1)), 2, None, 2)
while (slot := prefetch.get()) is not None:
    prefetch.give_back(slot)
prefetch.stop()
print(torch.get_num_threads())
"""


def test_the_consumers_torch_threads_are_its_own() -> None:
    """The threads' set_num_threads(1) must not become the consumer's count: torch keeps the last count
    set as the default of any thread that has not run a parallel op yet, the consumer's included. A fresh
    process, so the consumer has not."""
    assert fresh_process_output(PROBE) == ["2"]
