"""The torchvision baseline loader on real files: local disk and the local S3 endpoint (s3:// and cos://)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from feedrate.cifar import BATCH_DIR, TEST_BATCH, TRAIN_BATCHES, read_batch
from feedrate.errors import FeedrateError
from feedrate.storage import open_store
from loaders import CIFAR10_MEAN, CIFAR10_STD, Loader, LoaderConfig, make_loader
from shardgen import ShardgenConfig, build


def loader(data: str | Path, split: str = "test", **kwargs: object) -> Loader:
    settings: dict = {"batch_size": 64, "train": split == "train", "workers": 0} | kwargs
    return make_loader("torchvision", LoaderConfig(data=str(data), split=split, **settings))


def epoch(ld: Loader, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    ld.set_epoch(e)
    xs, ys = zip(*ld, strict=True)
    return torch.cat(xs), torch.cat(ys)


def normalised(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(CIFAR10_MEAN)[:, None, None]) / torch.tensor(CIFAR10_STD)[:, None, None]


def publish(dest: str, **kwargs: object) -> str:
    """A small synthetic dataset written by shardgen to `dest` (raw: the fastest to pack)."""
    settings: dict = {"fmt": "raw", "shard_size": 100, "synthetic_train": 200, "synthetic_test": 100}
    build(ShardgenConfig(dest=dest, source="synthetic", allow_download=False, **(settings | kwargs)))
    return dest


def test_local_batches_are_the_source_batches_normalised(tiny_dataset: Path) -> None:
    ld = loader(tiny_dataset, "test")
    assert isinstance(ld, Loader)
    assert (len(ld), ld.samples, ld.downloads, ld.decode_device) == (4, 200, [], "cpu")
    images, labels = epoch(ld, 1)
    want_x, want_y = read_batch(tiny_dataset / BATCH_DIR / TEST_BATCH, 10)
    assert images.dtype == torch.float32 and labels.dtype == torch.int64
    assert images.shape == (200, 3, 32, 32)
    assert torch.equal(labels, torch.from_numpy(want_y))
    assert torch.allclose(images, normalised(want_x), atol=1e-5)
    stats = ld.stats()
    assert stats["bytes_read"] >= (tiny_dataset / BATCH_DIR / TEST_BATCH).stat().st_size
    assert stats["requests"] >= 1
    assert (stats["cache_hits"], stats["cache_misses"], stats["retries"], stats["skipped"]) == (0, 0, 0, 0)


def test_training_split_is_shuffled_and_augmented_by_seed_and_epoch(tiny_dataset: Path) -> None:
    ld = loader(tiny_dataset, "train", workers=2, seed=7)
    assert (len(ld), ld.samples) == (10, 600)
    x1, y1 = epoch(ld, 1)
    x1_again, y1_again = epoch(ld, 1)
    _, y2 = epoch(ld, 2)
    source = np.concatenate([read_batch(tiny_dataset / BATCH_DIR / n, 10)[1] for n in TRAIN_BATCHES])
    assert sorted(y1.tolist()) == sorted(source.tolist())  # every sample once
    assert not torch.equal(y1, torch.from_numpy(source))  # shuffled
    assert torch.equal(y1, y1_again) and torch.equal(x1, x1_again)  # same seed and epoch: same epoch
    assert not torch.equal(y1, y2)
    # Augmented: RandomCrop's zero padding shows up as black borders, which the source rarely has.
    plain = epoch(loader(tiny_dataset, "train", train=False), 1)[0]
    black = -CIFAR10_MEAN[0] / CIFAR10_STD[0]

    def black_pixels(x: torch.Tensor) -> int:
        return int(torch.isclose(x[:, 0], torch.tensor(black), atol=1e-4).sum())

    assert black_pixels(x1) > 2 * black_pixels(plain) + 1000


def test_workers_serve_the_same_batches_as_the_main_process(tiny_dataset: Path) -> None:
    x0, y0 = epoch(loader(tiny_dataset, "test", workers=0, batch_size=50), 1)
    x2, y2 = epoch(loader(tiny_dataset, "test", workers=2, batch_size=50), 1)
    assert torch.equal(y0, y2) and torch.equal(x0, x2)


def test_distributed_ranks_get_disjoint_parts(tiny_dataset: Path) -> None:
    _, everything = epoch(loader(tiny_dataset, "test"), 1)
    parts = [epoch(loader(tiny_dataset, "test", rank=r, world_size=2), 1)[1] for r in (0, 1)]
    assert [len(p) for p in parts] == [100, 100]
    assert torch.equal(parts[0], everything[0::2]) and torch.equal(parts[1], everything[1::2])


def test_remote_batches_are_downloaded_verified_recorded_and_cached(bucket: str, tmp_path: Path) -> None:
    publish(f"s3://{bucket}/ds")
    served = {}
    for scheme in ("s3", "cos"):
        cache = tmp_path / f"cache-{scheme}"
        first = loader(f"{scheme}://{bucket}/ds", "train", cache_dir=str(cache))
        assert [(d.split, d.samples) for d in first.downloads] == [("train", 200)]
        download = first.downloads[0]
        assert 0 < download.loading <= download.duration
        stats = first.stats()
        assert (stats["cache_misses"], stats["cache_hits"]) == (5, 0)
        assert stats["requests"] >= 5
        (dataset_dir,) = cache.iterdir()  # one directory per dataset (loaders.shards.dataset_key)
        assert stats["bytes_read"] >= sum(p.stat().st_size for p in (dataset_dir / BATCH_DIR).iterdir())
        again = loader(f"{scheme}://{bucket}/ds", "train", cache_dir=str(cache))
        assert (again.stats()["cache_misses"], again.stats()["cache_hits"]) == (0, 5)
        assert [d.samples for d in again.downloads] == [200]
        served[scheme] = epoch(loader(f"{scheme}://{bucket}/ds", "test"), 1)
        assert served[scheme][0].shape == (100, 3, 32, 32)
    assert torch.equal(served["s3"][0], served["cos"][0])


def test_a_tampered_remote_batch_is_refused(bucket: str) -> None:
    url = publish(f"s3://{bucket}/ds")
    store = open_store(url)
    name = f"{BATCH_DIR}/{TEST_BATCH}"
    data = bytearray(store.read_bytes(name))
    data[-10] ^= 0xFF
    store.write_bytes(name, bytes(data))
    with pytest.raises(FeedrateError, match=TEST_BATCH):
        loader(url, "test")


def test_a_truncated_local_batch_is_refused(tiny_dataset: Path, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    shutil.copytree(tiny_dataset, root)
    batch = root / BATCH_DIR / TRAIN_BATCHES[2]
    batch.write_bytes(batch.read_bytes()[:1000])
    with pytest.raises(FeedrateError, match=f"{TRAIN_BATCHES[2]} has 1000 bytes"):
        loader(root, "train")


def test_missing_dataset_and_missing_split_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FeedrateError, match=r"no manifest\.json"):
        loader(tmp_path, "train")
    only_train = publish(str(tmp_path / "train-only"), splits=("train",))
    assert loader(only_train, "train").samples == 200
    with pytest.raises(FeedrateError, match="no split 'test'"):
        loader(only_train, "test")
