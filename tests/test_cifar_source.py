"""The CIFAR-10 source: user files, validation, the real download path (served on loopback), synthetic."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import pickle
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from feedrate import cifar, synthetic
from feedrate.cifar import SourceError, read_batch_dir, write_batch_dir
from shardgen import source
from shardgen.source import load_source


def _small_splits(n_train: int = 50, n_test: int = 20) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {
        "train": synthetic.generate(n_train, seed=1),
        "test": synthetic.generate(n_test, seed=2),
    }


@pytest.fixture
def batch_dir(tmp_path: Path) -> Path:
    d = tmp_path / "src" / cifar.BATCH_DIR
    write_batch_dir(d, _small_splits(), cifar.CLASS_NAMES, label="test")
    return d


def _archive_of(batch_dir: Path, path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(batch_dir, arcname=cifar.BATCH_DIR)
    return path


def test_batch_dir_round_trip(batch_dir: Path) -> None:
    splits, names = read_batch_dir(batch_dir)
    expected = _small_splits()
    assert names == list(cifar.CLASS_NAMES)
    for split in ("train", "test"):
        np.testing.assert_array_equal(splits[split][0], expected[split][0])
        np.testing.assert_array_equal(splits[split][1], expected[split][1])


def test_user_directory_is_custom_and_parent_dir_accepted(batch_dir: Path, tmp_path: Path) -> None:
    data = load_source(str(batch_dir.parent), tmp_path / "cache", tmp_path / "scratch")
    assert data.kind == "custom"
    assert len(data.splits["train"][1]) == 50 and len(data.splits["test"][1]) == 20


def test_user_archive_with_other_md5_warns_and_is_custom(batch_dir: Path, tmp_path: Path) -> None:
    archive = _archive_of(batch_dir, tmp_path / "mine.tar.gz")
    data = load_source(str(archive), tmp_path / "cache", tmp_path / "scratch")
    assert data.kind == "custom"
    assert any("md5" in note and "official" in note for note in data.notes)


def _rewrite(path: Path, **changes: object) -> None:
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    entry.update(changes)
    with open(path, "wb") as f:
        pickle.dump(entry, f)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: (d / "data_batch_3").unlink(), "data_batch_3"),
        (lambda d: _rewrite(d / "data_batch_1", data=np.zeros((10, 100), np.uint8)), "(N, 3072) uint8"),
        (lambda d: _rewrite(d / "test_batch", labels=[11] * 20), "label 11 is out of range"),
        (lambda d: _rewrite(d / "data_batch_2", labels=[0, 1]), "labels for"),
        (lambda d: (d / "batches.meta").write_bytes(b"not a pickle"), "batches.meta"),
    ],
)
def test_malformed_sources_name_the_problem(batch_dir: Path, tmp_path: Path, mutate, message: str) -> None:
    mutate(batch_dir)
    with pytest.raises(SourceError, match=None) as err:
        load_source(str(batch_dir), tmp_path / "cache", tmp_path / "scratch")
    assert message in str(err.value)


def test_missing_source_path(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        load_source(str(tmp_path / "nope"), tmp_path / "cache", tmp_path / "scratch")


@pytest.fixture
def archive_server(batch_dir: Path, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """An HTTP server on 127.0.0.1 serving a CIFAR-layout archive: (url, md5)."""
    served = tmp_path / "www"
    served.mkdir()
    archive = _archive_of(batch_dir, served / source.CIFAR10_ARCHIVE)
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{source.CIFAR10_ARCHIVE}"
        yield url, hashlib.md5(archive.read_bytes()).hexdigest()
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def test_download_verifies_md5_and_caches(archive_server, tmp_path: Path, monkeypatch) -> None:
    url, md5 = archive_server
    monkeypatch.setattr(source, "CIFAR10_URL", url)
    monkeypatch.setattr(source, "CIFAR10_MD5", md5)
    monkeypatch.setattr(source, "download_cifar10", functools.partial(source.download_cifar10, url=url))
    cache = tmp_path / "cache"
    data = load_source("auto", cache, tmp_path / "scratch")
    assert data.kind == "cifar10"
    assert (cache / source.CIFAR10_ARCHIVE).is_file()
    assert len(data.splits["train"][1]) == 50
    # Second use: served from the cache even with downloads off.
    again = load_source("auto", cache, tmp_path / "scratch2", allow_download=False)
    assert again.kind == "cifar10"


def test_download_with_wrong_md5_leaves_nothing(archive_server, tmp_path: Path, monkeypatch) -> None:
    url, _ = archive_server
    cache = tmp_path / "cache"
    with pytest.raises(SourceError, match="md5"):
        source.download_cifar10(cache, url=url)
    assert list(cache.iterdir()) == []


def test_auto_falls_back_to_synthetic_loudly(tmp_path: Path, capsys) -> None:
    data = load_source(
        "auto",
        tmp_path / "cache",
        tmp_path / "scratch",
        synthetic_train=30,
        synthetic_test=10,
        allow_download=False,
    )
    assert data.kind == "synthetic"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SYNTHETIC" in err


def test_synthetic_is_deterministic_balanced_and_learnable() -> None:
    x1, y1 = synthetic.generate(2000, seed=7)
    x2, y2 = synthetic.generate(2000, seed=7)
    x3, _ = synthetic.generate(2000, seed=8)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(x1, x3)
    assert x1.shape == (2000, 32, 32, 3) and x1.dtype == np.uint8
    assert np.bincount(y1, minlength=10).tolist() == [200] * 10
    # A nearest-centroid classifier on mean colour alone must beat chance (10%) clearly: the classes
    # carry structure a network can learn.
    feats = x1.reshape(2000, -1, 3).mean(axis=1)
    centroids = np.stack([feats[y1 == c].mean(axis=0) for c in range(10)])
    xt, yt = synthetic.generate(1000, seed=9)
    ft = xt.reshape(1000, -1, 3).mean(axis=1)
    pred = np.argmin(((ft[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (pred == yt).mean() > 0.3


def test_synthetic_test_split_is_no_seeds_training_split(tmp_path: Path) -> None:
    data = synthetic.make(tmp_path, 50, 50, seed=3)
    test_x, test_y = data.splits["test"]
    again = synthetic.generate(50, synthetic.test_seed(3))
    np.testing.assert_array_equal(test_x, again[0])  # deterministic by seed
    np.testing.assert_array_equal(test_y, again[1])
    for other in (3, 3 + 1_000_003, 4):  # the old offset made seed 3's test split this seed's training split
        assert not np.array_equal(test_x, synthetic.generate(50, other)[0])


def test_synthetic_batches_match_arrays(tmp_path: Path) -> None:
    data = load_source("synthetic", tmp_path / "c", tmp_path / "s", synthetic_train=40, synthetic_test=12)
    splits, _ = read_batch_dir(data.batch_dir)
    np.testing.assert_array_equal(splits["train"][0], data.splits["train"][0])
    buf = io.BytesIO((data.batch_dir / "test_batch").read_bytes())
    assert pickle.load(buf, encoding="latin1")["data"].shape == (12, 3072)
