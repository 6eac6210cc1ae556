"""state_dict() / load_state_dict() of the map-style loaders (tensor, torchvision): exact and elastic resume.

Several ranks run in one process as several LoaderConfig ranks, each iterated as train.py does (the same
number of steps on every rank); their states are merged as train.py merges them (loaders.resume.merge).
The encoded datasets' pixels say which sample an image is, so ids are read back from what was yielded.
"""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from encoded import decode_identity, encoded_images

from feedrate.errors import FeedrateError
from loaders import LoaderConfig, make_loader
from loaders.augment import EpochDraws
from loaders.resume import decode, encode, merge

N = 300  # samples of the train split
LOADERS = ("tensor", "torchvision")

Batch = tuple[list[int], torch.Tensor]  # (sample ids read from the pixels, the images)


@pytest.fixture(scope="module")
def root(make_encoded_dataset) -> str:
    return str(make_encoded_dataset("raw", n_train=N, n_test=100, shard_size=100))


def _loader(name: str, root: str, rank: int = 0, world: int = 1, workers: int = 0, **kw: Any):
    settings: dict[str, Any] = {"batch_size": 32, "train": True, "seed": 3} | kw
    cfg = LoaderConfig(root, "train", workers=workers, rank=rank, world_size=world, **settings)
    return make_loader(name, cfg)


def _batches(loader, limit: int | None = None) -> list[Batch]:
    """The loader's next `limit` batches (all when None), as train.py takes them."""
    out = []
    for images, labels in itertools.islice(loader, limit):
        ids, decoded = decode_identity(images)
        assert decoded == labels.tolist(), "every image carries its own label"
        out.append((ids, images.clone()))
    return out


def _ids(batches: list[Batch]) -> list[int]:
    return [i for ids, _ in batches for i in ids]


def _interrupted(
    name: str, root: str, world: int, steps: int, epoch: int = 1, workers: int = 0
) -> tuple[list[list[Batch]], dict[str, Any]]:
    """`steps` batches on every rank of `world`, then the merged state (what a checkpoint holds)."""
    got, states = [], []
    for rank in range(world):
        loader = _loader(name, root, rank, world, workers)
        loader.set_epoch(epoch)
        got.append(_batches(loader, steps))
        states.append(loader.state_dict())
        loader.close()
    return got, merge(states)


def _resumed(
    name: str, root: str, world: int, state: Mapping[str, Any], workers: int = 0, then: int | None = None
) -> tuple[list[list[Batch]], list[list[Batch]]]:
    """Every rank of `world` loads `state` and reads the rest of its epoch, then epoch `then` if given:
    (each rank's rest, each rank's later epoch)."""
    rest, later = [], []
    for rank in range(world):
        loader = _loader(name, root, rank, world, workers)
        loader.load_state_dict(state)
        loader.set_epoch(state["epoch"])
        samples, length = loader.samples, len(loader)
        part = _batches(loader)
        assert (len(_ids(part)), len(part)) == (samples, length), "samples and len() describe the rest"
        rest.append(part)
        if then is not None:
            loader.set_epoch(then)
            assert loader.samples == len(range(rank, N, world)), "a later epoch is whole"
            later.append(_batches(loader))
        loader.close()
    return rest, later


def _same(a: list[Batch], b: list[Batch], pixels: bool) -> None:
    assert [ids for ids, _ in a] == [ids for ids, _ in b]
    if pixels:
        assert all(torch.equal(x, y) for (_, x), (_, y) in zip(a, b, strict=True))


@pytest.mark.parametrize("name", LOADERS)
@pytest.mark.parametrize(("world", "workers"), [(1, 0), (2, 2)])
def test_same_counts_continue_with_the_uninterrupted_batches(
    root: str, name: str, world: int, workers: int
) -> None:
    whole = []
    for rank in range(world):
        loader = _loader(name, root, rank, world, workers)
        loader.set_epoch(1)
        whole.append(_batches(loader))
        loader.close()
    steps = 3
    got, state = _interrupted(name, root, world, steps, workers=workers)
    assert state["count"] == steps * 32 * world
    assert set(decode(state["consumed"], N).nonzero()[0]) == {i for part in got for i in _ids(part)}
    rest, _ = _resumed(name, root, world, json.loads(json.dumps(state)), workers)  # a checkpoint is JSON
    for rank in range(world):
        _same(got[rank], whole[rank][:steps], pixels=name == "tensor")
        # the order continues exactly; the tensor loader's augmentation too (the baseline's is exempt)
        _same(rest[rank], whole[rank][steps:], pixels=name == "tensor")


@pytest.mark.parametrize("name", LOADERS)
@pytest.mark.parametrize(("before", "after"), [((2, 0), (3, 2)), ((1, 2), (2, 0)), ((3, 0), (1, 1))])
def test_other_counts_read_the_rest_exactly_once(
    root: str, name: str, before: tuple[int, int], after: tuple[int, int]
) -> None:
    (world, workers), (new_world, new_workers) = before, after
    got, state = _interrupted(name, root, world, steps=2, workers=workers)
    rest, later = _resumed(name, root, new_world, state, new_workers, then=2)
    sizes = [len(_ids(part)) for part in rest]
    assert sum(sizes) == N - state["count"] and max(sizes) - min(sizes) <= 1, "the rest is dealt evenly"
    trained = _ids([b for part in got + rest for b in part])
    assert Counter(trained) == Counter(range(N)), "the interrupted epoch: every sample exactly once"
    assert Counter(_ids([b for part in later for b in part])) == Counter(range(N)), "the next epoch is whole"


def test_tensor_augmentation_is_each_samples_epoch_draw(root: str) -> None:
    """A sample's crop and flip are the (seed, epoch) draw for it, whichever rank and batch read it."""
    images, _ = encoded_images(N)
    draws = EpochDraws.draw(3, 1, N)
    got, state = _interrupted("tensor", root, world=2, steps=1)
    rest, _ = _resumed("tensor", root, 3, state)
    for ids, pixels in [b for part in got + rest for b in part]:
        index = torch.tensor(ids)
        want = draws.augment(torch.from_numpy(images[ids]), index, layout="NHWC")
        assert torch.equal(pixels, want)
    assert len(_ids([b for part in got + rest for b in part])) == N


@pytest.mark.parametrize("name", LOADERS)
def test_later_epochs_are_the_uninterrupted_ones(root: str, name: str) -> None:
    _, state = _interrupted(name, root, world=1, steps=4)
    _, later = _resumed(name, root, 1, state, then=2)
    fresh = _loader(name, root)
    fresh.set_epoch(2)
    _same(later[0], _batches(fresh), pixels=name == "tensor")


@pytest.mark.parametrize("name", LOADERS)
def test_states_before_iterating_and_after_an_epochs_end(root: str, name: str) -> None:
    loader = _loader(name, root)
    loader.set_epoch(1)
    state = loader.state_dict()
    assert (state["epoch"], state["count"], state["exact"]) == (1, 0, None)
    rest, _ = _resumed(name, root, 1, state)
    assert sorted(_ids(rest[0])) == list(range(N)), "nothing consumed yet: the whole epoch"
    seen = _batches(loader)
    assert loader.state_dict()["count"] == N == len(_ids(seen)), "an epoch's end: all of it consumed"
    ended = _loader(name, root)
    ended.load_state_dict(loader.state_dict())
    assert (ended.samples, len(ended), list(ended)) == (0, 0, []), "nothing left of that epoch"
    assert sorted(_ids(_batches(ended))) == list(range(N)), "the same epoch read again is whole"
    loader.set_epoch(2)
    assert (loader.state_dict()["epoch"], loader.state_dict()["count"]) == (2, 0)


@pytest.mark.parametrize("name", LOADERS)
def test_validation_resumes_in_its_fixed_order(root: str, name: str) -> None:
    loader = _loader(name, root, train=False, batch_size=50)
    loader.set_epoch(1)
    first = _ids(_batches(loader, 2))
    again = _loader(name, root, train=False, batch_size=50)
    again.load_state_dict(loader.state_dict())
    assert first + _ids(_batches(again)) == list(range(N))


def _bad(state: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**state, **changes}


@pytest.mark.parametrize("name", LOADERS)
def test_bad_states_are_refused_in_one_line(root: str, name: str) -> None:
    _, state = _interrupted(name, root, world=1, steps=1)
    other = "torchvision" if name == "tensor" else "tensor"
    bits = decode(state["consumed"], N)
    cases = {
        "loader": (_bad(state, loader=other), f"for loader '{other}'; this loader reads loader '{name}'"),
        "seed": (_bad(state, seed=4), "for seed 4; this loader reads seed 3"),
        "split": (_bad(state, split="test"), "for split 'test'"),
        "total": (_bad(state, total=N + 1), f"for total {N + 1}"),
        "bitmap": (_bad(state, consumed="not base64!"), "not base64"),
        "short": (_bad(state, consumed=encode(bits[:200])), "a split of 300 samples needs 38 bytes"),
        "count": (_bad(state, count=state["count"] + 1), "its count says"),
        "epoch": (_bad(state, epoch=-1), "epoch -1 must be an integer >= 0"),
        "missing": ({k: v for k, v in state.items() if k != "workers"}, "lacks workers"),
        "type": ([state], "expected a mapping"),
    }
    for why, (bad, message) in cases.items():
        loader = _loader(name, root)
        with pytest.raises(FeedrateError) as caught:
            loader.load_state_dict(bad)
        text = str(caught.value)
        assert message in text and "\n" not in text, (why, text)
        assert loader.samples == N, "a refused state changes nothing"


@pytest.mark.parametrize("name", LOADERS)
def test_the_state_counts_batches_handed_out_not_those_prepared_ahead(root: str, name: str) -> None:
    """Between two batches (as train.py asks), while the tensor loader's thread or DataLoader's workers
    have later batches ready, the state holds exactly the ids yielded so far."""
    loader = _loader(name, root, workers=2)
    loader.set_epoch(1)
    it = iter(loader)
    yielded: list[int] = []
    for k in range(1, len(loader) + 1):
        yielded += decode_identity(next(it)[0])[0]
        time.sleep(0.02)  # time for the reader to run ahead
        consumed = decode(loader.state_dict()["consumed"], N)
        assert set(consumed.nonzero()[0]) == set(yielded) and len(yielded) == min(N, 32 * k)
    loader.close()
