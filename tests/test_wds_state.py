"""The wds loader's state (loaders.resume's contract) on real tar shards: sample ids, per-sample
augmentation, DDP parts that differ by at most one sample, and mid-epoch resume -- exact with the same
counts (the uninterrupted run's batches, ids and pixels), elastic with others (the rest exactly once),
from local disk and from the local S3 server, with GETs counted at the server."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from feedrate.errors import FeedrateError
from feedrate.shardformat import parse_index
from loaders import resume
from loaders.partition import rank_units, remainder_rows, shard_order
from loaders.shards import open_dataset
from loaders.streaming import WdsLoader
from tests.helpers import TRAIN, build_coded, config

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # images, labels, ids


@pytest.fixture(scope="module")
def five(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """25 raw training samples in 5 shards of 5 (7 test samples in 2 shards)."""
    return build_coded(tmp_path_factory.mktemp("five") / "raw", "raw", shard_size=5)


@pytest.fixture(scope="module")
def nine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """25 raw training samples in shards of 9, 9 and 7: ranks' ranges cut shards."""
    return build_coded(tmp_path_factory.mktemp("nine") / "raw", "raw", shard_size=9)


def wds(data: Path | str, **kw: object) -> WdsLoader:
    kw.setdefault("options", {"keys": True, "shuffle_buffer": 6})
    return WdsLoader(config(data, **kw))


def key_of(data: Path, split: str = "train") -> list[str]:
    """The split's sample keys by sample id: shards in manifest order, rows in index order."""
    root = open_dataset(str(data))
    keys: list[str] = []
    for ref in root.shards(split):
        keys += parse_index((data / ref.index_name).read_text(), ref.name, "raw").keys
    return keys


def whole(loader: WdsLoader, e: int) -> list[Batch]:
    loader.set_epoch(e)
    return [(x, y, i) for x, y, i in loader.iter_ids()]


def interrupted(loader: WdsLoader, e: int, k: int) -> tuple[list[Batch], dict]:
    """The first k batches of epoch e, then the state as train.py takes it (iterator still open)."""
    loader.set_epoch(e)
    batches = loader.iter_ids()
    got = [next(batches) for _ in range(k)]
    state = loader.state_dict()
    batches.close()
    return got, state


def resumed(loader: WdsLoader, state: dict, e: int) -> list[Batch]:
    loader.load_state_dict(state)
    loader.set_epoch(state["epoch"])
    batches, samples = len(loader), loader.samples
    rest = whole(loader, e)
    assert len(rest) == batches and sum(len(y) for _, y, _ in rest) == samples, "len() and samples"
    assert loader.samples >= samples, "the epoch, iterated to its end, is whole again"
    return rest


def ids_of(batches: list[Batch]) -> list[int]:
    return [int(i) for _, _, ids in batches for i in ids]


def same_batches(a: list[Batch], b: list[Batch]) -> None:
    assert [len(y) for _, y, _ in a] == [len(y) for _, y, _ in b], "batch sizes"
    for (xa, ya, ia), (xb, yb, ib) in zip(a, b, strict=True):
        assert torch.equal(ia, ib), "the same samples in the same order"
        assert torch.equal(ya, yb) and torch.equal(xa, xb), "the same labels and pixels"


# -- ids and augmentation ----------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("train", [True, False])
def test_every_batch_carries_its_sample_ids(five: Path, workers: int, train: bool) -> None:
    split = "train" if train else "test"
    keys = key_of(five, split)
    with wds(five, workers=workers, train=train, split=split) as loader:
        loader.set_epoch(1)
        seen = []
        for _, _, batch_keys in loader.iter_keyed():
            seen += batch_keys
        got = ids_of(whole(loader, 1))
    assert [keys[i] for i in got] == seen, "id i is row i of the shards in manifest order"
    assert sorted(got) == list(range(len(keys)))
    assert all(isinstance(ids, torch.Tensor) and ids.dtype == torch.int64 for _, _, ids in whole(loader, 2))


def test_a_samples_augmentation_does_not_depend_on_who_reads_it(nine: Path) -> None:
    """Crop and flip come from the epoch's per-sample table (EpochDraws), looked up by id: the same
    for any worker count, rank, batch, and wherever the augmentation runs."""
    pixels: dict[tuple, dict[int, torch.Tensor]] = {}
    for workers, world_size, at in [(1, 1, "reader"), (3, 1, "reader"), (0, 1, "device"), (2, 2, "device")]:
        out = {}
        for rank in range(world_size):
            options = {"shuffle_buffer": 6, "augment_at": at}
            with wds(nine, workers=workers, rank=rank, world_size=world_size, options=options) as loader:
                for x, _, ids in whole(loader, 4):
                    out |= {int(i): image for i, image in zip(ids, x, strict=True)}
        pixels[(workers, world_size, at)] = out
    first, *others = pixels.values()
    assert len(first) == TRAIN
    for other in others:
        assert other.keys() == first.keys()
        assert all(torch.equal(other[i], first[i]) for i in first)
    with wds(nine, workers=1) as loader:
        later = {int(i): image for x, _, ids in whole(loader, 5) for i, image in zip(ids, x, strict=True)}
    assert any(not torch.equal(later[i], first[i]) for i in first), "another epoch, other draws"


# -- DDP parts -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shards", [[5] * 5, [9, 9, 7], [25], [3, 1, 4, 1, 5, 9, 2], [1] * 7])
@pytest.mark.parametrize("world_size", [2, 3, 4, 7])
def test_rank_ranges_differ_by_at_most_one_sample(shards: list[int], world_size: int) -> None:
    for e, shuffle in [(1, True), (2, True), (1, False)]:
        order = shard_order(len(shards), e, 0, shuffle)
        parts = [rank_units(shards, order, r, world_size) for r in range(world_size)]
        sizes = [sum(u.samples for u in p) for p in parts]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == sum(shards)
        flat = [(u.shard, i) for p in parts for u in p for i in range(u.first, u.stop)]
        assert flat == [(int(s), i) for s in order for i in range(shards[s])], "contiguous, in order"
        cut = sum(len(p) for p in parts) - len({u.shard for p in parts for u in p})
        assert cut <= world_size - 1, "at most R-1 shards cut"


def test_rank_ranges_of_a_remainder_differ_by_at_most_one_sample() -> None:
    rng = np.random.default_rng(0)
    shards = [9, 9, 7]
    for world_size in (1, 2, 3, 5):
        for _ in range(20):
            consumed = rng.random(25) < rng.random()
            rows = remainder_rows(shards, consumed)
            parts = [rank_units(shards, [2, 0, 1], r, world_size, rows) for r in range(world_size)]
            sizes = [sum(u.samples for u in p) for p in parts]
            assert max(sizes) - min(sizes) <= 1
            ids = sorted(
                9 * (u.shard > 0) + 9 * (u.shard > 1) + int(p)
                for part in parts
                for u in part
                for p in u.positions() + u.first
            )
            assert ids == np.flatnonzero(~consumed).tolist(), "the remainder exactly once"


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("verify", [True, False])
def test_ranks_of_a_real_loader_cover_the_epoch_with_parts_one_apart(
    nine: Path, world_size: int, verify: bool
) -> None:
    for e in (1, 2):
        seen, sizes, part_reads = [], [], 0
        for rank in range(world_size):
            # no reading ahead: the next epoch's first reads would count in this epoch's part_reads
            options = {"shuffle_buffer": 6, "verify": verify, "read_ahead": False}
            with wds(nine, workers=2, rank=rank, world_size=world_size, options=options) as loader:
                got = ids_of(whole(loader, e))
                assert len(got) == loader.samples
                sizes.append(loader.samples)
                seen += got
                part_reads += loader.stats()["part_reads"]
        assert sorted(seen) == list(range(TRAIN)) and max(sizes) - min(sizes) <= 1
        # a boundary between ranks inside a shard cuts it: under verify each part of a cut shard is a
        # whole, verified read; without, a ranged one
        ends = np.cumsum([[9, 9, 7][s] for s in shard_order(3, e, 0, shuffle=True)])
        cuts = Counter(
            int(np.searchsorted(ends, b, side="right"))
            for b in (r * TRAIN // world_size for r in range(1, world_size))
            if b not in ends
        )
        assert cuts, "the test cuts a shard"
        assert part_reads == (sum(c + 1 for c in cuts.values()) if verify else 0)


def tar_gets(server, bucket: str) -> int:
    return sum(1 for r in server.requests("GET", f"/{bucket}/ds/") if r.split("?")[0].endswith(".tar"))


@pytest.mark.parametrize("verify", [True, False])
def test_ranks_on_s3_read_each_shard_once_plus_one_read_per_cut(
    bucket: str, s3_env, tmp_path: Path, verify: bool
) -> None:
    url = f"s3://{bucket}/ds"
    build_coded(tmp_path / "ds", "raw", shard_size=9, url=url)
    before = tar_gets(s3_env, bucket)
    seen = []
    for rank in range(2):
        options = {"verify": verify, "read_ahead": False}
        with wds(url, workers=2, rank=rank, world_size=2, options=options) as loader:
            seen += ids_of(whole(loader, 1))
    assert sorted(seen) == list(range(TRAIN))
    assert tar_gets(s3_env, bucket) - before == 3 + 1, "3 shards, one of them cut between the 2 ranks"


# -- resume: the same counts ----------------------------------------------------------------------------
@pytest.mark.parametrize(("workers", "world_size"), [(0, 1), (2, 1), (3, 1), (2, 2), (1, 3)])
@pytest.mark.parametrize("data", ["five", "nine"])
def test_same_counts_resume_with_the_uninterrupted_batches(
    request: pytest.FixtureRequest, data: str, workers: int, world_size: int
) -> None:
    root = request.getfixturevalue(data)
    for rank in range(world_size):
        kw = {"workers": workers, "rank": rank, "world_size": world_size}
        with wds(root, **kw) as loader:
            straight, after = whole(loader, 3), whole(loader, 4)
        for k in range(len(straight) + 1):  # every point of the epoch, the tail's short batches too
            with wds(root, **kw) as loader:
                head, state = interrupted(loader, 3, k)
            same_batches(head, straight[:k])
            assert state["count"] == sum(len(y) for _, y, _ in head)
            with wds(root, **kw) as loader:
                rest = resumed(loader, state, 3)
                assert loader.resumed["mode"] == "exact"
                same_batches(rest, straight[k:])
                same_batches(whole(loader, 4), after)  # the next epoch whole again, as uninterrupted
                assert len(loader) == len(after)


def test_same_counts_resume_from_a_merged_ddp_state(nine: Path) -> None:
    kws = [{"workers": 2, "rank": r, "world_size": 2} for r in range(2)]
    straight = []
    for kw in kws:
        with wds(nine, **kw) as loader:
            straight.append(whole(loader, 2))
    states, heads = [], []
    for kw, k in zip(kws, (2, 1), strict=True):  # ranks may be stopped at different steps
        with wds(nine, **kw) as loader:
            head, state = interrupted(loader, 2, k)
        heads.append(head)
        states.append(state)
    merged = resume.merge(states)
    for kw, full, k in zip(kws, straight, (2, 1), strict=True):
        with wds(nine, **kw) as loader:
            same_batches(resumed(loader, merged, 2), full[k:])


def test_a_resumed_pass_can_be_checkpointed_and_resumed_again(five: Path) -> None:
    with wds(five, workers=2) as loader:
        straight = whole(loader, 1)
    with wds(five, workers=2) as loader:
        _, first = interrupted(loader, 1, 2)
    with wds(five, workers=2) as loader:
        loader.load_state_dict(first)
        loader.set_epoch(1)
        assert loader.state_dict() == first, "a loaded state round-trips"
        batches = loader.iter_ids()
        next(batches)
        second = loader.state_dict()
        batches.close()
    assert second["count"] == first["count"] + 4
    with wds(five, workers=2) as loader:
        same_batches(resumed(loader, second, 1), straight[3:])


def test_validation_resumes_in_stored_order(five: Path) -> None:
    kw = {"workers": 2, "split": "test", "train": False}
    with wds(five, **kw) as loader:
        straight = whole(loader, 1)
    with wds(five, **kw) as loader:
        head, state = interrupted(loader, 1, 1)
    with wds(five, **kw) as loader:
        same_batches(head + resumed(loader, state, 1), straight)


def test_an_exact_resume_replays_each_reader_once_and_every_pass_starts_at_the_position(
    five: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """load_state_dict replays each reader's draws once (checking the position and finding where the
    reader resumes, the batch before a short one still waiting included); every pass of the resumed
    epoch starts from copies of those points, so a pass abandoned and begun again is the same."""
    from loaders import streaming

    calls = []
    real = streaming.skip_draws

    def counted(*args: object, **kw: object) -> object:
        calls.append(args[-1] if len(args) > 5 else None)
        return real(*args, **kw)  # type: ignore[arg-type]

    with wds(five, workers=2) as loader:
        straight = whole(loader, 1)
    waiting = 0
    for k in range(1, len(straight)):
        with wds(five, workers=2) as loader:
            _, state = interrupted(loader, 1, k)
        waiting += bool(state["exact"]["pending"])
        monkeypatch.setattr(streaming, "skip_draws", counted)
        calls.clear()
        with wds(five, workers=2) as loader:
            loader.load_state_dict(state)
            loader.set_epoch(1)
            first = loader.iter_ids()
            next(first)
            first.close()  # abandoned after a batch
            rest = whole(loader, 1)
            assert len(calls) == 2, f"{len(calls)} replays for 2 readers (k={k})"
        monkeypatch.setattr(streaming, "skip_draws", real)
        same_batches(rest, straight[k:])
    assert waiting, "some positions had a short batch waiting"


def test_a_state_of_another_dataset_of_as_many_samples_is_refused(five: Path, nine: Path) -> None:
    """`five` and `nine` both hold 25 training samples (in other shards): the state names its dataset."""
    with wds(five, workers=2) as loader:
        _, state = interrupted(loader, 1, 2)
    with (
        wds(nine, workers=2) as loader,
        pytest.raises(FeedrateError, match=r"is for dataset 'raw-") as caught,
    ):
        loader.load_state_dict(state)
    assert "\n" not in str(caught.value)


# -- resume: other counts (elastic) ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("before", "after"),
    [((2, 1), (1, 1)), ((2, 2), (1, 3)), ((0, 3), (3, 2)), ((1, 2), (2, 1)), ((3, 1), (0, 4))],
)
def test_other_counts_resume_with_the_rest_exactly_once(
    nine: Path, before: tuple[int, int], after: tuple[int, int]
) -> None:
    (w0, r0), (w1, r1) = before, after
    for ks in itertools.islice(itertools.product((0, 1, 3), repeat=r0), 4):
        states, handed = [], []
        for rank, k in enumerate(ks):
            with wds(nine, workers=w0, rank=rank, world_size=r0) as loader:
                head, state = interrupted(loader, 2, k)
            states.append(state)
            handed += ids_of(head)
        merged = resume.merge(states)
        rest, sizes, later = [], [], []
        for rank in range(r1):
            with wds(nine, workers=w1, rank=rank, world_size=r1) as loader:
                loader.load_state_dict(merged)
                assert loader.resumed["mode"] == "elastic" and "counts differ" in loader.resumed["why"]
                loader.set_epoch(2)
                sizes.append(loader.samples)
                rest += ids_of(resumed(loader, merged, 2))
                later += ids_of(whole(loader, 3))
                assert loader.samples == (rank + 1) * TRAIN // r1 - rank * TRAIN // r1, "later epochs whole"
        assert Counter(handed + rest) == Counter(range(TRAIN)), f"exactly once, stopped at {ks}"
        assert max(sizes) - min(sizes) <= 1, "the remainder's parts differ by at most one sample"
        assert sorted(later) == list(range(TRAIN)), "the next epoch is whole"


def test_an_elastic_pass_resumes_exactly_with_its_own_counts(nine: Path) -> None:
    with wds(nine, workers=2) as loader:
        _, state = interrupted(loader, 1, 2)
    with wds(nine, workers=1) as loader:  # elastic: the rest, dealt to one reader
        straight = resumed(loader, state, 1)
    with wds(nine, workers=1) as loader:
        loader.load_state_dict(state)
        loader.set_epoch(1)
        batches = loader.iter_ids()
        head = [next(batches)]
        again = loader.state_dict()
        batches.close()
    assert again["exact"]["base"] is not None, "the pass's plan left the first state's samples out"
    with wds(nine, workers=1) as loader:
        rest = resumed(loader, again, 1)
        assert loader.resumed["mode"] == "exact"
    same_batches(head + rest, straight)


def test_skip_bad_resumes_elastically(five: Path) -> None:
    options = {"keys": True, "shuffle_buffer": 6, "skip_bad": True}
    with wds(five, workers=2, options=options) as loader:
        head, state = interrupted(loader, 1, 2)
    assert state["exact"] is None
    with wds(five, workers=2, options=options) as loader:
        rest = resumed(loader, state, 1)
        assert loader.resumed["mode"] == "elastic" and "skip_bad" in loader.resumed["why"]
    assert Counter(ids_of(head) + ids_of(rest)) == Counter(range(TRAIN))


# -- resume from S3 --------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [2, 1])
def test_resume_from_s3_reads_only_what_is_left(bucket: str, s3_env, tmp_path: Path, workers: int) -> None:
    url = f"s3://{bucket}/ds"
    build_coded(tmp_path / "ds", "raw", shard_size=5, url=url)
    options = {"keys": True, "shuffle_buffer": 6, "read_ahead": False}
    with wds(url, workers=2, options=options) as loader:
        straight = whole(loader, 1)
        head, state = interrupted(loader, 1, 4)
    with wds(url, workers=workers, options=options) as loader:
        before = tar_gets(s3_env, bucket)
        rest = resumed(loader, state, 1)
        gets = tar_gets(s3_env, bucket) - before
        info = loader.resumed
    assert Counter(ids_of(head) + ids_of(rest)) == Counter(range(TRAIN))
    # Either way a shard is read once when a sample of it is left, never when none is: exact resume
    # reads again the shards the readers' buffers still held (`refetch_units`), elastic the remainder's.
    left_shards = {i // 5 for i in set(range(TRAIN)) - set(ids_of(head))}
    assert gets == len(left_shards)
    if workers == 2:
        same_batches(rest, straight[4:])
        assert info["mode"] == "exact" and 1 <= info["refetch_units"] <= len(left_shards)
    else:
        assert info["mode"] == "elastic" and info["refetch_units"] == 0


# -- bad states ------------------------------------------------------------------------------------------
def test_bad_states_are_refused_with_one_line(five: Path) -> None:
    with wds(five, workers=2) as loader:
        _, state = interrupted(loader, 1, 3)
    exact = state["exact"]

    def refused(change: dict, match: str) -> None:
        with wds(five, workers=2) as loader, pytest.raises(FeedrateError, match=match) as caught:
            loader.load_state_dict(state | change)
        assert "\n" not in str(caught.value)

    refused({"loader": "dali"}, r"loader 'dali'; this loader reads loader 'wds'")
    refused({"seed": 5}, r"seed 5; this loader reads seed 0")
    refused({"total": 24}, r"total 24")
    refused({"exact": {**exact, "batches": [9, 9]}}, r"exact batches \[9, 9\]; accepted: a list of 2")
    refused({"exact": {**exact, "batches": [1]}}, r"exact batches")
    refused({"exact": {**exact, "done": [True, True]}}, r"exact done")
    refused({"exact": {**exact, "turn": [0, 0]}}, r"exact turn")
    refused({"exact": {**exact, "pending": [[0, 0, 1]]}}, r"exact pending")
    refused({"exact": {**exact, "pending": "x"}}, r"exact pending")
    refused({"exact": {**exact, "base": "AAAA"}}, r"`consumed` holds 24 bits")
    refused({"exact": [1, 2]}, r"exact data \[1, 2\]; accepted: a mapping")
    # a position that does not match the consumed set: a batch more than the bitmap says
    more = {**exact, "batches": [exact["batches"][0] + 1, exact["batches"][1]]}
    refused({"exact": more}, r"exact position .* accounts for 16 samples .* holds 12")
    consumed = resume.decode(state["consumed"], TRAIN)
    consumed[np.flatnonzero(consumed)[0]] = False
    tampered = {"consumed": resume.encode(consumed), "count": state["count"] - 1}
    refused(tampered, r"exact position")
    base = resume.encode(~consumed)
    refused(
        tampered | {"exact": {**exact, "base": base}}, r"exact base holds samples its consumed set does not"
    )
