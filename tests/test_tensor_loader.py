"""The device-resident tensor loader: exactly once, labels aligned, augmentation as the baseline's."""

from __future__ import annotations

import shutil
from collections import Counter

import pytest
import torch
from encoded import decode_identity

from loaders import LoaderConfig, make_loader


def _epoch(loader) -> tuple[list[int], list[int], list[int]]:
    seen, labels, sizes = [], [], []
    for images, target in loader:
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 32, 32)
        assert target.dtype == torch.int64
        index, decoded = decode_identity(images)
        assert decoded == target.tolist(), "every image carries its own label"
        seen += index
        labels += decoded
        sizes.append(len(target))
    return seen, labels, sizes


@pytest.mark.parametrize("train", [True, False])
def test_exactly_once_and_aligned(make_encoded_dataset, train: bool) -> None:
    root = make_encoded_dataset("raw", n_train=300, n_test=100, shard_size=100)
    loader = make_loader("tensor", LoaderConfig(str(root), "train", batch_size=64, train=train))
    assert loader.samples == 300 and len(loader) == 5
    seen, _, sizes = _epoch(loader)
    assert sorted(seen) == list(range(300))
    assert sizes == [64, 64, 64, 64, 44], "the last batch is partial, never padded"
    if not train:
        assert seen == list(range(300)), "validation order is fixed"


def test_epochs_reshuffle_deterministically(make_encoded_dataset) -> None:
    root = str(make_encoded_dataset("raw", n_train=300, n_test=100, shard_size=100))
    a = make_loader("tensor", LoaderConfig(root, "train", batch_size=50, train=True, seed=3))
    b = make_loader("tensor", LoaderConfig(root, "train", batch_size=50, train=True, seed=3))
    a.set_epoch(1)
    b.set_epoch(1)
    first = _epoch(a)[0]
    assert first == _epoch(b)[0]
    a.set_epoch(2)
    assert _epoch(a)[0] != first


def test_ranks_are_disjoint_and_cover_the_split(make_encoded_dataset) -> None:
    root = str(make_encoded_dataset("raw", n_train=300, n_test=100, shard_size=100))
    parts = []
    for rank in range(3):
        cfg = LoaderConfig(root, "train", batch_size=32, train=True, rank=rank, world_size=3)
        parts.append(_epoch(make_loader("tensor", cfg))[0])
    assert sorted(i for part in parts for i in part) == list(range(300))


def test_crops_cover_every_offset_of_the_zero_padding(make_encoded_dataset) -> None:
    """Crops shift by 0..8 pixels into zero padding, vertically and horizontally, as torchvision's."""
    root = make_encoded_dataset("raw", n_train=300, n_test=100, shard_size=100)
    loader = make_loader("tensor", LoaderConfig(str(root), "train", batch_size=300, train=True))
    images, _ = next(iter(loader))
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    pixels = torch.round((images * std + mean) * 255)
    # Encoded images never have all three channels at 0 except index 0 with label 0 (not in the set:
    # label of index 0 is 3), so an all-zero pixel is padding.
    padding = (pixels == 0).all(dim=1)  # (N, H, W)
    shifts = Counter()
    for pad in padding:
        top = int(pad[:4, 16].sum())
        bottom = int(pad[28:, 16].sum())
        left = int(pad[16, :4].sum())
        right = int(pad[16, 28:].sum())
        assert top * bottom == 0 and left * right == 0
        shifts[(top - bottom, left - right)] += 1
    assert {dy for dy, _ in shifts} == set(range(-4, 5))
    assert {dx for _, dx in shifts} == set(range(-4, 5))


def test_flip_rate_on_asymmetric_images(tmp_path) -> None:
    import numpy as np

    from feedrate.cifar import CLASS_NAMES, write_batch_dir
    from shardgen import ShardgenConfig, build

    n = 400
    images = np.zeros((n, 32, 32, 3), dtype=np.uint8)
    images[:, :, :16] = 200  # left half bright
    labels = np.zeros(n, dtype=np.int64)
    write_batch_dir(
        tmp_path / "src" / "cifar-10-batches-py",
        {"train": (images, labels), "test": (images[:10], labels[:10])},
        CLASS_NAMES,
        "flip",
    )
    build(ShardgenConfig(dest=str(tmp_path / "ds"), source=str(tmp_path / "src"), fmt="raw", shard_size=200))
    loader = make_loader("tensor", LoaderConfig(str(tmp_path / "ds"), "train", batch_size=n, train=True))
    batch, _ = next(iter(loader))
    left_bright = (batch[:, 0, 16, 12] > batch[:, 0, 16, 20]).float().mean().item()
    assert 0.35 < left_bright < 0.65


def test_remote_load_is_recorded_as_a_download(make_encoded_dataset, bucket, s3_server, tmp_path) -> None:
    from feedrate.storage import open_store

    root = make_encoded_dataset("raw", n_train=300, n_test=100, shard_size=100)
    store = open_store(f"s3://{bucket}/enc")
    for path in sorted(root.rglob("*")):
        if path.is_file():
            store.put_file(path, path.relative_to(root).as_posix())
    cfg = LoaderConfig(
        f"s3://{bucket}/enc", "test", batch_size=64, train=False, cache_dir=str(tmp_path / "c")
    )
    loader = make_loader("tensor", cfg)
    assert [d.split for d in loader.downloads] == ["test"]
    assert loader.downloads[0].samples == 100
    assert loader.downloads[0].duration >= loader.downloads[0].loading > 0
    assert sorted(_epoch(loader)[0]) == list(range(10_000, 10_100))
    gets = s3_server.requests("GET", f"/{bucket}/enc/cifar-10-batches-py/")
    assert len(gets) == 1, gets
    shutil.rmtree(tmp_path / "c")


def _batches(loader, epoch: int) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return [(decode_identity(images)[0], images.clone(), labels.clone()) for images, labels in loader]


@pytest.mark.parametrize("train", [True, False])
def test_every_worker_count_gives_the_same_batches(make_encoded_dataset, train: bool) -> None:
    """workers=N is N preparation threads (0: the consumer's own): batch k depends on its ids alone, so
    ids, labels and pixels (crops and flips included) are the same for every N, in every epoch and rank."""
    root = str(make_encoded_dataset("raw", n_train=300, n_test=100, shard_size=100))
    for rank in (0, 1):
        made = {}
        for workers in (0, 1, 2, 3):
            cfg = LoaderConfig(
                root, "train", batch_size=32, train=train, workers=workers, seed=4, rank=rank, world_size=2
            )
            loader = make_loader("tensor", cfg)
            made[workers] = [_batches(loader, epoch) for epoch in (0, 1)]
            loader.close()
        reference = made[0]
        assert len(reference[0]) == 5  # 150 samples a rank
        if train:
            assert reference[0][0][0] != reference[1][0][0], "epochs differ"
        for workers, epochs in made.items():
            for ref_epoch, epoch in zip(reference, epochs, strict=True):
                assert len(epoch) == len(ref_epoch), workers
                for (ids, images, labels), (ref_ids, ref_images, ref_labels) in zip(
                    epoch, ref_epoch, strict=True
                ):
                    assert ids == ref_ids, workers
                    assert torch.equal(labels, ref_labels) and torch.equal(images, ref_images), workers


def test_a_state_resumes_under_another_worker_count(make_encoded_dataset) -> None:
    """The state is the ids handed out: saved with 2 threads, loaded with 3 (or 0), the rest of the epoch
    is the uninterrupted run's, pixel for pixel."""
    root = str(make_encoded_dataset("raw", n_train=300, n_test=100, shard_size=100))

    def loader(workers: int):
        cfg = LoaderConfig(root, "train", batch_size=32, train=True, workers=workers, seed=2)
        return make_loader("tensor", cfg)

    whole = _batches(loader(2), 1)
    first = loader(2)
    first.set_epoch(1)
    it = iter(first)
    for _ in range(4):
        next(it)
    state = first.state_dict()
    first.close()
    for workers in (3, 0):
        resumed = loader(workers)
        resumed.load_state_dict(state)
        rest = [(decode_identity(i)[0], i.clone(), t.clone()) for i, t in resumed]
        assert len(rest) == len(whole) - 4
        for (ids, images, labels), (w_ids, w_images, w_labels) in zip(rest, whole[4:], strict=True):
            assert ids == w_ids and torch.equal(images, w_images) and torch.equal(labels, w_labels)
