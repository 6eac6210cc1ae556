"""The loader-state contract (loaders.resume) and the per-sample augmentation table (EpochDraws) that
lets a resumed epoch repeat an uninterrupted one's pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from feedrate.errors import FeedrateError
from loaders import resume
from loaders.augment import EpochDraws, crop_flip, normalize


def _state(consumed: list[int], total: int = 20, **changes: object) -> dict:
    progress = resume.Progress(total)
    progress.start(3)
    progress.mark(consumed)
    return progress.state("wds", "train", 7, workers=2, world_size=1, exact={"n": [1, 2]}) | changes


def test_a_state_round_trips_through_json_and_check() -> None:
    state = json.loads(json.dumps(_state([0, 5, 19])))
    consumed = resume.check(state, "wds", "train", 7, 20)
    assert np.flatnonzero(consumed).tolist() == [0, 5, 19]
    assert state["count"] == 3 and state["epoch"] == 3


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"loader": "dali"}, "loader 'dali'"),
        ({"split": "test"}, "split 'test'"),
        ({"seed": 8}, "seed 8"),
        ({"total": 21}, "total 21"),
        ({"version": 2}, "version 2"),
        ({"epoch": -1}, "epoch -1"),
        ({"epoch": True}, "epoch True"),
        ({"count": 4}, "count says 4"),
        ({"consumed": "!!!!"}, "not base64 text"),
        ({"consumed": "not base64!"}, "not the base64 of 3 bytes"),
        ({"consumed": "AAAAAAAA"}, "needs 3 bytes"),
        ({"workers": -1}, "workers -1"),
    ],
)
def test_a_bad_state_is_one_line_naming_the_bad_value(changes: dict, named: str) -> None:
    with pytest.raises(FeedrateError, match=named) as info:
        resume.check(_state([1, 2, 3]) | changes, "wds", "train", 7, 20)
    assert "\n" not in str(info.value)


def test_a_state_without_a_key_or_not_a_mapping_is_refused() -> None:
    state = _state([1])
    del state["consumed"]
    with pytest.raises(FeedrateError, match="lacks consumed"):
        resume.check(state, "wds", "train", 7, 20)
    with pytest.raises(FeedrateError, match="is a list"):
        resume.check([], "wds", "train", 7, 20)  # type: ignore[arg-type]


def test_merge_ors_the_ranks_bitmaps_and_keeps_each_ranks_exact_data() -> None:
    a, b = _state([0, 2], exact={"r": 0}), _state([1, 2], exact={"r": 1})
    merged = resume.merge([a, b])
    assert np.flatnonzero(resume.check(merged, "wds", "train", 7, 20)).tolist() == [0, 1, 2]
    assert merged["ranks"] == [{"r": 0}, {"r": 1}]
    assert resume.exact_for(merged, 1) == {"r": 1} and resume.exact_for(merged, 2) is None
    assert resume.exact_for(a, 0) == {"r": 0}
    with pytest.raises(FeedrateError, match="disagree on the loader state's epoch"):
        resume.merge([a, _state([3], epoch=4)])


def test_remaining_keeps_the_order_and_drops_the_consumed() -> None:
    order = np.array([4, 0, 3, 1, 2])
    consumed = np.array([False, True, False, True, False])
    assert resume.remaining(order, consumed).tolist() == [4, 0, 2]
    assert resume.remaining(order, None) is order


def test_same_counts() -> None:
    state = _state([1])
    assert resume.same_counts(state, 2, 1) and not resume.same_counts(state, 1, 1)
    assert not resume.same_counts(state, 2, 2)


def test_epoch_draws_depend_on_seed_and_epoch_and_cover_the_range() -> None:
    a, b = EpochDraws.draw(0, 1, 5000), EpochDraws.draw(0, 1, 5000)
    assert torch.equal(a.dy, b.dy) and torch.equal(a.dx, b.dx) and torch.equal(a.flip, b.flip)
    other = EpochDraws.draw(0, 2, 5000)
    assert not torch.equal(a.dy, other.dy)
    assert not torch.equal(a.dy, EpochDraws.draw(1, 1, 5000).dy)
    assert set(a.dy.tolist()) == set(range(9)) and set(a.dx.tolist()) == set(range(9))
    assert 0.45 < a.flip.float().mean().item() < 0.55
    assert not torch.equal(a.dy, a.dx)  # rows and columns drawn apart


def test_a_samples_augmentation_is_the_same_in_any_batch() -> None:
    draws = EpochDraws.draw(3, 1, 100)
    images = torch.randint(0, 256, (100, 32, 32, 3), dtype=torch.uint8)
    whole = draws.augment(images, torch.arange(100), "NHWC")
    ids = torch.tensor([57, 3, 99, 10])
    part = draws.augment(images[ids].contiguous(), ids, "NHWC")
    assert torch.equal(part, whole[ids])
    expected = normalize(crop_flip(images[ids], draws.dy[ids], draws.dx[ids], draws.flip[ids], layout="NHWC"))
    assert torch.equal(part, expected)
    nchw = draws.augment(images[ids].permute(0, 3, 1, 2).contiguous(), ids, "NCHW")
    assert torch.equal(nchw, expected)


def test_progress_refuses_an_impossible_split_size() -> None:
    with pytest.raises(FeedrateError, match="cannot be tracked"):
        resume.Progress(0)


def test_a_state_of_another_dataset_is_refused_when_the_loader_names_its_own() -> None:
    progress = resume.Progress(20, dataset="raw-0123456789abcdef")
    progress.start(1)
    state = progress.state("wds", "train", 7, workers=2, world_size=1)
    assert resume.check(state, "wds", "train", 7, 20, "raw-0123456789abcdef").sum() == 0
    with pytest.raises(FeedrateError, match="for dataset 'raw-0123456789abcdef'; this loader reads dataset"):
        resume.check(state, "wds", "train", 7, 20, "raw-fedcba9876543210")


def test_a_sample_handed_out_twice_in_an_epoch_is_an_error_at_once() -> None:
    progress = resume.Progress(20)
    progress.start(2)
    progress.mark([3, 4])
    with pytest.raises(FeedrateError, match="sample 4 was handed out twice in epoch 2"):
        progress.mark([5, 4])
    with pytest.raises(FeedrateError, match="sample 9 was handed out twice"):
        progress.mark([9, 9])
    assert np.flatnonzero(progress.consumed).tolist() == [3, 4]  # a refused batch marks nothing


def test_an_oversized_bitmap_is_refused_before_it_is_decoded() -> None:
    with pytest.raises(FeedrateError, match="not the base64 of 3 bytes"):
        resume.decode("A" * 10_000_000, 20)
