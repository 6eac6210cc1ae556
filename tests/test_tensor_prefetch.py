"""The tensor loader's CPU thread: batches prepared ahead, exactly once, by seed, stopped on every exit."""

from __future__ import annotations

import _thread
import threading
import time

import pytest
import torch
from encoded import decode_identity

from feedrate.errors import FeedrateError
from loaders import LoaderConfig, make_loader
from loaders.resident import AHEAD, HELD, Slot


def _threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "tensor-prefetch" and t.is_alive()]


@pytest.fixture
def root(make_encoded_dataset) -> str:
    return str(make_encoded_dataset("raw", n_train=300, n_test=100, shard_size=100))


def _loader(root: str, batch_size: int = 32, train: bool = True, seed: int = 0):
    return make_loader("tensor", LoaderConfig(root, "train", batch_size=batch_size, train=train, seed=seed))


def test_every_epoch_exactly_once_and_the_thread_ends_with_it(root: str) -> None:
    loader = _loader(root, batch_size=64)
    orders = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        seen, sizes = [], []
        for images, labels in loader:
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
    """The thread makes the draws a synchronous loop would, whether the consumer is fast or slow."""
    fast = [(i.clone(), t.clone()) for i, t in _loader(root, train=train, seed=5)]
    slow = []
    for images, labels in _loader(root, train=train, seed=5):
        time.sleep(0.01)  # the thread runs ahead while the step "computes"
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


def test_buffers_are_reused_unless_a_batch_is_kept(root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    loader = _loader(root, batch_size=20)  # 15 batches
    made = []
    new_slot = loader._new_slot

    def counted() -> Slot:
        made.append(1)
        return new_slot()

    monkeypatch.setattr(loader, "_new_slot", counted)
    seen = [i for images, _ in loader for i in decode_identity(images)[0]]
    assert sorted(seen) == list(range(300))
    assert len(made) == AHEAD + HELD, "batches nobody kept go back into the ring"
    made.clear()
    kept = list(loader)  # every batch kept: none may be overwritten
    views = [images[:3] for images, _ in loader]  # the same epoch again; views keep their buffers too
    arrays = [labels.numpy() for _, labels in loader]  # and so do numpy arrays over them
    assert len(made) >= 3 * (len(loader) - AHEAD - HELD), "a kept buffer is replaced, not refilled"
    assert sorted(i for images, _ in kept for i in decode_identity(images)[0]) == list(range(300))
    for (images, labels), view in zip(kept, views, strict=True):
        assert decode_identity(images)[1] == labels.tolist()
        assert torch.equal(view, images[:3])
    assert [a.tolist() for a in arrays] == [labels.tolist() for _, labels in kept]


def test_the_thread_stays_at_most_AHEAD_batches_ahead(root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    loader = _loader(root, batch_size=30)  # 10 batches
    started = []
    make_fill = loader._filler

    def filler(order: torch.Tensor):
        fill = make_fill(order)

        def counted(slot: Slot, k: int) -> None:
            started.append(k)
            fill(slot, k)

        return counted

    monkeypatch.setattr(loader, "_filler", filler)
    for taken, _ in enumerate(loader, start=1):
        time.sleep(0.02)  # an unbounded thread would prepare the whole epoch meanwhile
        assert len(started) <= taken + AHEAD, (taken, started)
    assert started == list(range(10)), "each batch is prepared once, in order"


def test_close_and_abandoning_an_epoch_stop_the_thread(root: str) -> None:
    loader = _loader(root)
    it = iter(loader)
    next(it)
    assert len(_threads()) == 1
    del it  # an abandoned epoch (train.py's --max-batches)
    assert _threads() == []
    first = iter(loader)
    next(first)
    second = iter(loader)  # a new epoch while the old iterator is still alive: the old thread stops
    seen = [i for images, _ in second for i in decode_identity(images)[0]]
    assert sorted(seen) == list(range(300)) and _threads() == []
    del first
    it = iter(loader)
    next(it)
    loader.close()
    assert _threads() == []
    loader.close()  # twice is fine
    with pytest.raises(FeedrateError, match="was closed; make a new one"):
        next(iter(loader))


def _failing(loader, at: int, error: BaseException | None = None, delay: float = 0.0):
    make_fill = loader._filler

    def filler(order: torch.Tensor):
        fill = make_fill(order)

        def fails(slot: Slot, k: int) -> None:
            if k == at:
                if delay:
                    time.sleep(delay)
                if error is not None:
                    raise error
            fill(slot, k)

        return fails

    return filler


def test_an_error_in_the_thread_reaches_the_consumer(root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    loader = _loader(root)
    monkeypatch.setattr(loader, "_filler", _failing(loader, at=2, error=ValueError("bad batch 2")))
    got = 0
    with pytest.raises(ValueError, match="bad batch 2"):
        for _ in loader:
            got += 1
    assert got == 2, "the batches before the failure arrive first"
    assert _threads() == []


def test_an_interrupt_while_waiting_stops_the_thread(root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGINT (train.py turns SIGTERM into the same) while the consumer waits on a slow batch."""
    loader = _loader(root)
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
