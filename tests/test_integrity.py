"""No byte of someone else's dataset reaches training unchecked: the loader-side findings of the integrity
review, each with a test that fails on the code before its fix.

1. Every shard and CIFAR batch file is checked against the manifest's sha256 by default, local or remote,
   streaming included (`verify=false` opts out, and the loader says so).
2. The wds loader's exactly-once check runs when train.py stops after `len()` batches.
3. An image whose header declares a size other than 32x32 is refused before it is decoded.
4. Labels are class indices: too many digits (int64 would wrap), non-digits and values outside
   0..classes-1 are errors naming the shard and the key.

Real parts throughout: shards written by shardgen, the moto server process (tests/conftest.py), the
real DALI CPU pipeline, train.py's own epoch loop.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import tarfile
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import train
from feedrate.errors import FeedrateError
from feedrate.manifest import MANIFEST_NAME
from feedrate.shardformat import ShardError, parse_index, write_index
from feedrate.storage import open_store
from loaders import LoaderConfig, make_loader, shards, streaming
from loaders.dali_pipe import DaliError, label_rows
from loaders.dali_pipe import parse_labels as dali_parse_labels
from loaders.decode import MAX_LABEL_DIGITS, parse_labels
from loaders.shards import LocalVerdicts, ShardFetcher, ShardRef, open_dataset
from loaders.streaming import WdsLoader
from tests.helpers import TRAIN, all_keys, build_coded, config, epoch, needs_dali
from training.timing import Clock

WRAPS_TO_3 = str(2**64 + 3).encode()  # 20 digits: int64 arithmetic makes it class 3
WRAPS_TO_IGNORE = str(2**64 - 100).encode()  # 20 digits: int64 makes it -100, CrossEntropy's ignore index


def flip_byte(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x01
    return bytes(out)


def image_offset(idx_text: str, name: str, fmt: str, position: int) -> int:
    """Where sample `position`'s image starts inside shard `name` (a byte of pixels, not a tar header)."""
    return int(parse_index(idx_text, name, fmt).image_offset[position]) + 7


# -- 1. verified by default --------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("fmt", ["raw", "png"])
def test_a_shard_flipped_on_the_server_is_an_error_by_default(
    fmt: str, workers: int, bucket: str, s3_env, tmp_path: Path
) -> None:
    url = f"s3://{bucket}/ds"
    build_coded(tmp_path / "ds", fmt, shard_size=10, url=url)
    store = open_store(url)
    name = "train-000001.tar"
    at = image_offset(store.read_bytes("train-000001.idx").decode(), name, fmt, 3)
    store.write_bytes(name, flip_byte(store.read_bytes(name), at))  # the manifest is left as it was
    with WdsLoader(config(url, workers=workers)) as loader:
        assert loader.verify is True
        with pytest.raises(ShardError, match=rf"^s3://{bucket}/ds/train-000001\.tar is corrupt: sha256"):
            epoch(loader)


def test_the_opt_out_reads_a_flipped_shard_and_says_so(bucket: str, s3_env, tmp_path: Path) -> None:
    url = f"s3://{bucket}/ds"
    build_coded(tmp_path / "ds", "raw", shard_size=10, url=url)
    store = open_store(url)
    with WdsLoader(config(url, split="test", train=False)) as loader:  # no read-ahead into a next epoch
        assert Counter(epoch(loader)[0]) == Counter(all_keys(7, "test"))
        shard_bytes = sum(r.bytes for r in loader._fetcher.root.shards("test"))
        assert loader.stats()["verified_bytes"] == shard_bytes, "every shard byte was checked"
    name = "train-000000.tar"
    at = image_offset(store.read_bytes("train-000000.idx").decode(), name, "raw", 1)
    store.write_bytes(name, flip_byte(store.read_bytes(name), at))
    with WdsLoader(config(url, options={"keys": True, "verify": "false"})) as loader:
        assert loader.verify is False
        assert Counter(epoch(loader)[0]) == Counter(all_keys()), "the opt-out reads it without a word"
        stats = loader.stats()
        assert stats["verified_bytes"] == 0 and stats["bytes_read"] > 0, "and the counters show it"


def test_a_local_shard_flipped_is_an_error_by_default(tmp_path: Path) -> None:
    root = build_coded(tmp_path / "ds", "raw", shard_size=10)
    shard = root / "train-000002.tar"
    at = image_offset((root / "train-000002.idx").read_text(), shard.name, "raw", 2)
    shard.write_bytes(flip_byte(shard.read_bytes(), at))
    with WdsLoader(config(root, workers=2)) as loader, pytest.raises(ShardError) as caught:
        epoch(loader)
    assert str(caught.value).startswith(f"{shard} is corrupt: sha256")


def aged(root: Path) -> Path:
    """Backdate every file of `root` past LocalVerdicts.RACY_NS (a file written in the last second is
    hashed on every read, as git re-checks its racy entries); its ctime stays now, which is why the
    tests that need trusted files also set RACY_NS to 0."""
    for path in root.rglob("*"):
        if path.is_file():
            os.utime(path, ns=(time.time_ns() - 10**10, time.time_ns() - 10**10))
    return root


@pytest.fixture
def no_racy_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(LocalVerdicts, "RACY_NS", 0)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_local_shard_unchanged_since_it_was_hashed_is_not_hashed_again(
    workers: int, tmp_path: Path, no_racy_window: None
) -> None:
    root = aged(build_coded(tmp_path / "ds", "raw", shard_size=10))
    with WdsLoader(config(root, workers=workers, options={"keys": True, "read_ahead": False})) as loader:
        shard_bytes = sum(r.bytes for r in loader._fetcher.root.shards("train"))
        first = Counter(epoch(loader, 0)[0])
        assert loader.stats()["verified_bytes"] == shard_bytes and loader.stats()["unchanged_bytes"] == 0
        assert Counter(epoch(loader, 1)[0]) == first == Counter(all_keys())
        stats = loader.stats()
        assert stats["verified_bytes"] == shard_bytes, "the second epoch hashed nothing again"
        assert stats["unchanged_bytes"] == shard_bytes, "and counted every byte it trusted"


def test_a_local_shard_changed_between_epochs_is_hashed_again_and_refused(
    tmp_path: Path, no_racy_window: None
) -> None:
    root = aged(build_coded(tmp_path / "ds", "raw", shard_size=10))
    shard = root / "train-000002.tar"
    at = image_offset((root / "train-000002.idx").read_text(), shard.name, "raw", 2)
    with WdsLoader(config(root, workers=2, options={"keys": True, "read_ahead": False})) as loader:
        epoch(loader, 0)
        before = shard.stat()
        shard.write_bytes(flip_byte(shard.read_bytes(), at))  # same size,
        os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))  # same mtime: its ctime tells
        with pytest.raises(ShardError) as caught:
            epoch(loader, 1)
    assert str(caught.value).startswith(f"{shard} is corrupt: sha256")


def test_a_local_shard_written_in_the_racy_window_is_hashed_on_every_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the window widened to an hour, so that "just written" holds however slow the machine is
    monkeypatch.setattr(LocalVerdicts, "RACY_NS", 3600 * 10**9)
    root = build_coded(tmp_path / "ds", "raw", shard_size=10)  # just written: within RACY_NS
    with WdsLoader(config(root, options={"keys": True, "read_ahead": False})) as loader:
        shard_bytes = sum(r.bytes for r in loader._fetcher.root.shards("train"))
        epoch(loader, 0)
        epoch(loader, 1)
        assert loader.stats()["verified_bytes"] == 2 * shard_bytes and loader.stats()["unchanged_bytes"] == 0


def trusted_fetcher(root: Path) -> tuple[ShardFetcher, ShardRef, bytes]:
    """A fetcher that has hashed `root`'s second training shard once (so trusts it from now on)."""
    fetcher = ShardFetcher(open_dataset(str(root)), verdicts=LocalVerdicts())
    ref = fetcher.root.shards("train")[1]
    good = bytes(fetcher.read(ref))
    assert fetcher.unchanged_bytes == 0 and bytes(fetcher.read(ref)) == good
    assert fetcher.unchanged_bytes == ref.bytes, "the second read trusted it"
    return fetcher, ref, good


def test_a_trusted_shard_that_changes_while_it_is_read_is_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_racy_window: None
) -> None:
    root = aged(build_coded(tmp_path / "ds", "raw", shard_size=10))
    fetcher, ref, good = trusted_fetcher(root)
    shard = root / ref.name
    at = image_offset((root / ref.index_name).read_text(), ref.name, "raw", 1)
    real_read = shards.read_exact

    def read_then_write(stream: object, *args: object, **kw: object) -> bytearray:
        data = real_read(stream, *args, **kw)  # the trusted bytes are read; then someone writes the file
        with open(shard, "r+b") as fh:  # in place: the same inode, so only its times tell
            fh.seek(at)
            fh.write(bytes([good[at] ^ 0x01]))
        data[at] ^= 0x01  # as if the read had seen the new byte
        return data

    monkeypatch.setattr(shards, "read_exact", read_then_write)
    with pytest.raises(ShardError, match="is corrupt: sha256"):
        fetcher.read(ref)
    monkeypatch.undo()
    with pytest.raises(ShardError, match="is corrupt: sha256"):
        fetcher.read(ref)  # and it is hashed from now on


def test_a_dataset_directory_swapped_in_for_the_open_is_hashed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_racy_window: None
) -> None:
    """The signature is the open file's: a directory holding a tampered copy swapped in for the
    dataset's just for the open, and out again before any stat by path (renaming a directory changes
    no time of the files in it, so a stat by path before and after the read would have trusted it)."""
    root = aged(build_coded(tmp_path / "ds", "raw", shard_size=10))
    fetcher, ref, good = trusted_fetcher(root)
    aside, forged = tmp_path / "aside", tmp_path / "forged"
    forged.mkdir()
    at = image_offset((root / ref.index_name).read_text(), ref.name, "raw", 1)
    (forged / ref.name).write_bytes(flip_byte(good, at))
    store = fetcher.root.store
    real_open = store.open_read

    def swapped_open(name: str, *args: object, **kw: object):  # type: ignore[no-untyped-def]
        os.replace(root, aside)
        os.replace(forged, root)
        try:
            return real_open(name, *args, **kw)  # opens the forged file
        finally:
            os.replace(root, forged)
            os.replace(aside, root)  # the real directory is back, every file's stat as it was

    monkeypatch.setattr(store, "open_read", swapped_open)
    with pytest.raises(ShardError, match="is corrupt: sha256"):
        fetcher.read(ref)


def test_rehash_hashes_a_local_shard_on_every_read(tmp_path: Path, no_racy_window: None) -> None:
    root = aged(build_coded(tmp_path / "ds", "raw", shard_size=10))
    options = {"keys": True, "read_ahead": False, "rehash": True}
    with WdsLoader(config(root, options=options)) as loader:
        shard_bytes = sum(r.bytes for r in loader._fetcher.root.shards("train"))
        epoch(loader, 0)
        epoch(loader, 1)
        assert loader.stats()["verified_bytes"] == 2 * shard_bytes and loader.stats()["unchanged_bytes"] == 0


def test_a_cached_copy_edited_with_its_mtime_restored_is_fetched_again(
    bucket: str, s3_env, tmp_path: Path, no_racy_window: None
) -> None:
    """The cache's copies are trusted by LocalVerdicts' rule too: a (size, mtime) stamp, as the cache
    kept before, took a copy edited in place with its mtime set back for the one it had hashed."""
    url = f"s3://{bucket}/ds"
    build_coded(tmp_path / "ds", "raw", shard_size=10, url=url)
    cache = tmp_path / "cache"
    options = {"keys": True, "read_ahead": False}
    with WdsLoader(config(url, cache_dir=str(cache), options=options)) as loader:
        assert Counter(epoch(loader, 0)[0]) == Counter(all_keys())  # every shard fetched and cached
        misses = loader.stats()["cache_misses"]
        epoch(loader, 1)  # every copy hashed again (written by this process just now), then trusted
        assert loader.stats()["cache_misses"] == misses
        (copy,) = cache.rglob("train-000001.tar")
        before = copy.stat()
        at = image_offset(open_store(url).read_bytes("train-000001.idx").decode(), copy.name, "raw", 1)
        copy.write_bytes(flip_byte(copy.read_bytes(), at))
        os.utime(copy, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert Counter(epoch(loader, 2)[0]) == Counter(all_keys()), "the good bytes, fetched again"
        assert loader.stats()["cache_misses"] == misses + 1
    assert (
        hashlib.sha256(copy.read_bytes()).hexdigest()
        == hashlib.sha256(open_store(url).read_bytes("train-000001.tar")).hexdigest()
    ), "and the copy was replaced by a good one"


def batch_file(root: Path) -> Path:
    doc = json.loads((root / MANIFEST_NAME).read_text())
    return root / doc["batch_dir"] / "data_batch_3"


@pytest.mark.parametrize("name", ["torchvision", "tensor"])
def test_a_flipped_local_cifar_batch_is_an_error_by_default(name: str, tmp_path: Path) -> None:
    root = build_coded(tmp_path / "ds", "raw", shard_size=10)
    path = batch_file(root)
    data = path.read_bytes()
    path.write_bytes(flip_byte(data, len(data) // 2))  # a pixel: the pickle still loads
    cfg = LoaderConfig(data=str(root), split="train", batch_size=4, train=False)
    with pytest.raises(ShardError, match=rf"^{path} is corrupt: sha256"):
        make_loader(name, cfg)
    loader = make_loader(name, LoaderConfig(**{**cfg.__dict__, "options": {"verify": False}}))
    assert loader.verify is False and loader.samples == TRAIN and loader.stats()["verified_bytes"] == 0
    loader.close()


def test_a_cifar_batch_flipped_on_the_server_is_an_error(bucket: str, s3_env, tmp_path: Path) -> None:
    url = f"s3://{bucket}/ds"
    build_coded(tmp_path / "ds", "raw", shard_size=10, url=url)
    store = open_store(url)
    name = f"{json.loads(store.read_bytes(MANIFEST_NAME))['batch_dir']}/data_batch_2"
    data = store.read_bytes(name)
    store.write_bytes(name, flip_byte(data, len(data) // 2))
    cfg = LoaderConfig(data=url, split="train", batch_size=4, train=False)
    with pytest.raises(ShardError, match=r"data_batch_2 does not match the manifest"):
        make_loader("torchvision", cfg)


@needs_dali
def test_dali_checks_a_local_shard_before_reading_it(tmp_path: Path) -> None:
    root = build_coded(tmp_path / "ds", "raw", shard_size=10)
    shard = root / "train-000001.tar"
    at = image_offset((root / "train-000001.idx").read_text(), shard.name, "raw", 0)
    shard.write_bytes(flip_byte(shard.read_bytes(), at))
    cfg = LoaderConfig(data=str(root), split="train", batch_size=4, train=True, workers=1)
    with pytest.raises(ShardError, match=rf"^{shard} is corrupt: sha256"):
        make_loader("dali", cfg)
    loader = make_loader("dali", LoaderConfig(**{**cfg.__dict__, "options": {"verify": False}}))
    assert loader.verify is False
    loader.close()


# -- 2. exactly once under train.py's loop -------------------------------------------------------------
def train_py_epoch(loader: WdsLoader) -> int:
    """One epoch as train.py runs it: exactly len() batches, then the iterator closed; samples seen."""
    seen = []
    train.run_epoch(loader, len(loader), lambda x, y: seen.append(len(y)), Clock(), "train", bar=False)
    return sum(seen)


@pytest.fixture(scope="module")
def five_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_coded(tmp_path_factory.mktemp("five") / "raw", "raw", shard_size=5)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers", [0, 2])
def test_over_delivery_is_caught_within_len_batches(
    five_shards: Path, workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = streaming.reader_units

    def duplicated(units, readers, shard_samples, split):  # type: ignore[no-untyped-def]
        dealt = real(units, readers, shard_samples, split)
        return [dealt[0] + dealt[0][:1], *dealt[1:]]  # reader 0 reads one unit twice

    monkeypatch.setattr(streaming, "reader_units", duplicated)
    with (
        WdsLoader(config(five_shards, workers=workers)) as loader,
        # caught the moment the repeat is handed out (loaders.resume.Progress), before the epoch's count
        pytest.raises(FeedrateError, match=r"sample \d+ was handed out twice in epoch 0"),
    ):
        train_py_epoch(loader)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_sound_epoch_passes_the_check_epoch_after_epoch(five_shards: Path, workers: int) -> None:
    with WdsLoader(config(five_shards, workers=workers)) as loader:
        for e in range(3):
            loader.set_epoch(e)
            assert train_py_epoch(loader) == TRAIN


# -- 3. declared image sizes -------------------------------------------------------------------------
def huge_png(side: int = 30000) -> bytes:
    """A valid png of a few dozen bytes whose IHDR declares side x side RGB pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def huge_jpg(side: int = 30000) -> bytes:
    """A real 32x32 jpg whose frame header (SOF0) is made to declare side x side pixels."""
    out = io.BytesIO()
    Image.new("RGB", (32, 32), (9, 99, 199)).save(out, "JPEG", quality=90)
    data = bytearray(out.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", side, side)
    return bytes(data)


def replace_member(root: Path, name: str, position: int, ext: str, payload: bytes) -> str:
    """Sample `position` of shard `name` given `payload` as its .`ext` member; the shard re-indexed and
    the manifest brought in line (so only the payload is wrong). Returns the sample's key."""
    shard = root / name
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]  # type: ignore[union-attr]
    key = members[2 * position][0].split(".")[0]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            data = payload if member == f"{key}.{ext}" else data
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    write_index(shard, shard.with_suffix(".idx"))
    doc = json.loads((root / MANIFEST_NAME).read_text())
    for entry in doc["splits"]["train"]["shards"]:
        if entry["name"] == name:
            idx = root / entry["index"]["name"]
            entry.update(bytes=shard.stat().st_size, sha256=hashlib.sha256(shard.read_bytes()).hexdigest())
            entry["index"].update(
                bytes=idx.stat().st_size, sha256=hashlib.sha256(idx.read_bytes()).hexdigest()
            )
    (root / MANIFEST_NAME).write_text(json.dumps(doc, indent=2))
    return key


@pytest.mark.parametrize("decode", ["auto", "pil"])
@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_an_image_declaring_a_huge_size_is_refused_before_decoding(
    fmt: str, decode: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root = build_coded(tmp_path / "ds", fmt, shard_size=10, train=20, test=5)
    key = replace_member(root, "train-000001.tar", 4, fmt, huge_png() if fmt == "png" else huge_jpg())
    options = {"keys": True, "decode": decode}
    expected = rf"train-000001\.tar: sample {key}: cannot decode \(its \w+ header declares 30000x30000 pixels"
    with (
        WdsLoader(config(root, train=False, options=options)) as loader,
        pytest.raises(ShardError, match=expected),
    ):
        epoch(loader)
    with WdsLoader(config(root, train=False, options=options | {"skip_bad": True})) as loader:
        assert Counter(epoch(loader)[0]) == Counter(all_keys(20) - {key})
        assert loader.stats()["skipped"] == 1
    assert f"({key}): cannot decode (its" in capfd.readouterr().err


# -- 4. labels are class indices -----------------------------------------------------------------------
def padded(*rows: bytes) -> np.ndarray:
    width = max(8, *(len(r) for r in rows))
    return np.array([list(r.ljust(width, b"\0")) for r in rows], dtype=np.uint8)


@pytest.mark.parametrize("label", [WRAPS_TO_3, WRAPS_TO_IGNORE, b"1234567", b"-1", b"+3", b"10"])
def test_dali_label_parsing_refuses_what_is_not_a_class(label: bytes) -> None:
    _, bad = label_rows(padded(b"4", label), 10)
    assert bad.tolist() == [False, True]
    with pytest.raises(DaliError, match=r"0\.\.9"):
        dali_parse_labels(padded(b"4", label), 10)


@pytest.mark.parametrize(
    ("label", "problem"),
    [
        (WRAPS_TO_3, "20 digits (at most 6)"),
        (WRAPS_TO_IGNORE, "20 digits (at most 6)"),
        (b"-1", "is not an integer"),
        (b"10", "label 10 is outside 0..9"),
    ],
)
def test_wds_label_parsing_refuses_what_is_not_a_class(label: bytes, problem: str) -> None:
    from loaders.decode import label_problem  # new with the fix: imported here, so the other tests run

    buffer = memoryview(bytearray(b"4" + label))
    offsets, sizes = np.array([0, 1]), np.array([1, len(label)])
    assert parse_labels(buffer, offsets, sizes, classes=10)[1] == 1
    assert problem in label_problem(buffer, 1, len(label), classes=10)
    labels, first = parse_labels(buffer, offsets[:1], sizes[:1], classes=10)
    assert labels.tolist() == [4] and first == -1
    assert MAX_LABEL_DIGITS == 6


def test_a_wrapping_label_in_a_shard_names_the_shard_and_key(tmp_path: Path) -> None:
    root = build_coded(tmp_path / "ds", "raw", shard_size=10)
    key = replace_member(root, "train-000001.tar", 6, "cls", WRAPS_TO_3)
    with WdsLoader(config(root)) as loader, pytest.raises(ShardError) as caught:
        epoch(loader)
    assert str(caught.value) == (
        f"{root / 'train-000001.tar'}: sample {key}: the .cls member holds '{WRAPS_TO_3.decode()}', "
        "20 digits (at most 6); expected a class index 0..9"
    )


@needs_dali
def test_dali_names_the_shard_and_key_of_a_wrapping_label(tmp_path: Path) -> None:
    root = build_coded(tmp_path / "ds", "raw", shard_size=10)
    key = replace_member(root, "train-000001.tar", 6, "cls", WRAPS_TO_IGNORE)
    # batch size 1: a batch of one wide label is a dense tensor, so DALI hands it over (mixed with
    # 1-digit labels, the batch's ragged shape would stop DALI first)
    cfg = LoaderConfig(data=str(root), split="train", batch_size=1, train=False, workers=1)
    expected = (
        rf"holds b'{WRAPS_TO_IGNORE.decode()}'.*the first bad sample: .*train-000001\.tar: sample {key}: "
    )
    with pytest.raises(DaliError, match=expected):
        for _ in make_loader("dali", cfg):
            pass
