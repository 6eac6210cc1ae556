"""The wds loader on real shards: exactly once, label alignment, S3/COS with GETs counted at the server,
the cache, verification and errors that name the shard and the sample."""

from __future__ import annotations

import io
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from feedrate.errors import FeedrateError
from feedrate.shardformat import ShardError, parse_index
from loaders import CIFAR10_MEAN, CIFAR10_STD, make_loader, streaming
from loaders.decode import DECODERS, decode_choices, parse_labels
from loaders.handoff import ReaderThreads
from loaders.partition import Unit, cut, rank_units, reader_units, shard_order
from loaders.shards import open_dataset
from loaders.streaming import WdsLoader
from tests.helpers import TRAIN, all_keys, build_coded, config, epoch, fresh_process_output


@pytest.fixture(scope="module")
def coded(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Raw datasets of 25 training samples in 1, 2 and 5 shards."""
    root = tmp_path_factory.mktemp("coded")
    return {shards: build_coded(root / f"raw-{shards}", "raw", -(-TRAIN // shards)) for shards in (1, 2, 5)}


# -- exactly once ------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core machine
@pytest.mark.parametrize("shards", [1, 2, 5])
@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_every_sample_exactly_once_per_epoch(coded: dict[int, Path], shards: int, workers: int) -> None:
    assert len(open_dataset(str(coded[shards])).shards("train")) == shards
    with WdsLoader(
        config(coded[shards], workers=workers, options={"keys": True, "shuffle_buffer": 6})
    ) as loader:
        assert loader.samples == TRAIN and len(loader) == 7
        orders = []
        for e in range(2):
            keys, images, labels = epoch(loader, e)
            assert Counter(keys) == Counter(all_keys()), f"epoch {e}: duplicates or missing samples"
            assert [len(y) for y in labels] == [4] * 6 + [1], "full batches, the last one partial"
            assert all(x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 for x in images)
            orders.append(keys)
        assert orders[0] != orders[1], "set_epoch reshuffles"


@pytest.mark.parametrize("workers", [0, 2])
def test_an_abandoned_epoch_does_not_leak_into_the_next(coded: dict[int, Path], workers: int) -> None:
    with WdsLoader(config(coded[5], workers=workers)) as loader:
        loader.set_epoch(0)
        next(loader.iter_keyed())  # stop after one batch, as a --max-batches run does
        keys, _, _ = epoch(loader, 1)
    assert Counter(keys) == Counter(all_keys())


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_disjoint_parts_that_cover_the_split(coded: dict[int, Path], world_size: int) -> None:
    seen: list[str] = []
    total = 0
    for rank in range(world_size):
        with WdsLoader(config(coded[2], workers=2, rank=rank, world_size=world_size)) as loader:
            keys, _, _ = epoch(loader)
            assert len(keys) == loader.samples
            total += loader.samples
            seen += keys
    assert total == TRAIN and Counter(seen) == Counter(all_keys())


def test_partition_units() -> None:
    assert [u.samples for u in cut(Unit(0, 0, 10, whole=True), 4, 10)] == [2, 3, 2, 3]
    assert all(u.whole for u in rank_units([5, 5, 5], shard_order(3, 1, 0, shuffle=True), 0, 1))
    units = rank_units([7, 7], shard_order(2, 0, 0, shuffle=False), rank=0, world_size=1)
    dealt = reader_units(units, 3, [7, 7], split=True)  # fewer units than readers: cut into ranges
    assert all(dealt), "no reader idles where ranged reads are allowed"
    covered = [(u.shard, i) for part in dealt for u in part for i in range(u.first, u.stop)]
    assert sorted(covered) == [(s, i) for s in range(2) for i in range(7)]
    assert reader_units(units, 6, [7, 7], split=False)[2:] == [[]] * 4, "an idle reader gets nothing"
    # ranks: contiguous ranges of the epoch's shard order, cut at most world_size - 1 times
    order = shard_order(3, 2, 0, shuffle=True)
    parts = [rank_units([5, 5, 5], order, r, 2) for r in range(2)]
    assert [sum(u.samples for u in p) for p in parts] == [7, 8]
    assert [(u.shard, u.first, u.stop) for p in parts for u in p] == [
        (int(order[0]), 0, 5),
        (int(order[1]), 0, 2),
        (int(order[1]), 2, 5),
        (int(order[2]), 0, 5),
    ]


def test_same_seed_same_epoch(coded: dict[int, Path]) -> None:
    runs = []
    for _ in range(2):
        with WdsLoader(config(coded[5], workers=2)) as loader:
            keys, images, _ = epoch(loader, 3)
            runs.append((keys, torch.cat(images)))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1]), "same seed: same order and same augmentation"
    with WdsLoader(config(coded[5], workers=2, seed=1)) as loader:
        assert epoch(loader, 3)[0] != runs[0][0]


# -- label alignment -----------------------------------------------------------------------------------
def decoded_codes(images: torch.Tensor, at: tuple[int, int] = (16, 16)) -> np.ndarray:
    """Back from normalised float to 0-255 pixel values at one position, (n, 3)."""
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3)
    std = torch.tensor(CIFAR10_STD).view(1, 3)
    pixels = images[:, :, at[0], at[1]] * std + mean
    return torch.round(pixels * 255).to(torch.int64).numpy()


def check_aligned(
    keys: list[str], images: list[torch.Tensor], labels: list[torch.Tensor], train: bool, tolerance: int = 0
) -> None:
    x, y = torch.cat(images), torch.cat(labels)
    codes = decoded_codes(x)  # the centre pixel survives any crop of at most 4 pixels
    index = np.array([int(k.rsplit("_", 1)[1]) for k in keys])
    expected = np.stack([20 * y.numpy() + 10, index % 256, index // 256 + 100], axis=1)
    assert np.abs(codes - expected).max() <= tolerance, "label and key match the image"
    corners = [decoded_codes(x, (0, 0)), decoded_codes(x, (31, 31))]
    if not train:  # validation is untouched: every pixel is the original, normalised
        assert all(np.abs(c - codes).max() <= tolerance for c in corners)
    else:  # training crops pad with zeros somewhere in most samples
        assert any((c == 0).all(axis=1).any() for c in corners)


@pytest.mark.parametrize(("fmt", "tolerance"), [("png", 0), ("raw", 0), ("jpg", 3)])
@pytest.mark.parametrize("train", [True, False])
def test_every_pair_aligned(tmp_path: Path, fmt: str, tolerance: int, train: bool) -> None:
    data = build_coded(tmp_path / fmt, fmt, shard_size=10, train=40, test=15)
    split, n = ("train", 40) if train else ("test", 15)
    with WdsLoader(config(data, split=split, train=train, workers=2, batch_size=8)) as loader:
        keys, images, labels = epoch(loader)
    assert sorted(keys) == sorted(all_keys(n, split))
    check_aligned(keys, images, labels, train, tolerance)


@pytest.mark.parametrize("at", ["reader", "device"])
def test_aligned_wherever_the_augmentation_runs(coded: dict[int, Path], at: str) -> None:
    with WdsLoader(config(coded[5], workers=2, options={"keys": True, "augment_at": at})) as loader:
        check_aligned(*epoch(loader), train=True)


# -- object stores ----------------------------------------------------------------------------------
def tar_gets(server, bucket: str) -> int:
    return sum(1 for r in server.requests("GET", f"/{bucket}/ds/") if r.split("?")[0].endswith(".tar"))


@pytest.mark.parametrize("scheme", ["s3", "cos"])
def test_object_store_one_get_per_shard_per_epoch(scheme: str, bucket: str, s3_env, tmp_path: Path) -> None:
    url = f"{scheme}://{bucket}/ds"
    build_coded(tmp_path / "ds", "raw", shard_size=10, train=30, test=5, url=url)
    before = tar_gets(s3_env, bucket)
    with WdsLoader(config(url, workers=2)) as loader:
        for e in range(2):
            keys, _, _ = epoch(loader, e)
            assert Counter(keys) == Counter(all_keys(30))
            # one GET per shard per epoch; the next epoch's first shards may already be on their way
            # (the readers read ahead across the epoch boundary), never a shard twice in one epoch
            assert 3 * (e + 1) <= tar_gets(s3_env, bucket) - before <= 3 * (e + 2), "one GET per shard"
        stats = loader.stats()
    assert stats["requests"] >= 6 and stats["bytes_read"] > 6 * 10 * 3072


def test_cache_dir_second_epoch_makes_no_get(bucket: str, s3_env, tmp_path: Path) -> None:
    url = f"s3://{bucket}/ds"
    build_coded(tmp_path / "ds", "raw", shard_size=10, train=20, test=5, url=url)
    cache = tmp_path / "cache"
    before = tar_gets(s3_env, bucket)
    with WdsLoader(config(url, workers=2, cache_dir=str(cache))) as loader:
        assert Counter(epoch(loader, 0)[0]) == Counter(all_keys(20))
        assert tar_gets(s3_env, bucket) - before == 2
        # one directory per dataset (loaders.shards.dataset_key), holding the shards under their names
        (dataset_dir,) = cache.iterdir()
        assert sorted(p.name for p in dataset_dir.glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
        assert Counter(epoch(loader, 1)[0]) == Counter(all_keys(20))
        assert tar_gets(s3_env, bucket) - before == 2, "second epoch reads the cache only"
        stats = loader.stats()
        assert stats["cache_misses"] >= 2 and stats["cache_hits"] >= 2
        # a corrupt cached copy is detected and fetched again
        shard = dataset_dir / "train-000001.tar"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
        assert Counter(epoch(loader, 2)[0]) == Counter(all_keys(20))
        assert tar_gets(s3_env, bucket) - before == 3
        assert loader.stats()["cache_misses"] == stats["cache_misses"] + 1


# -- bad shards and bad input -------------------------------------------------------------------------
@pytest.fixture
def png_copy(tmp_path: Path) -> Path:
    return build_coded(tmp_path / "png", "png", shard_size=10, train=20, test=5)


def test_verify_names_a_corrupt_shard(png_copy: Path) -> None:
    shard = png_copy / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[-2000] ^= 0x01  # one bit in the last sample's png
    shard.write_bytes(bytes(data))
    with (
        WdsLoader(config(png_copy, options={"verify": True, "keys": True})) as loader,
        pytest.raises(ShardError, match=r"train-000001\.tar is corrupt: sha256"),
    ):
        epoch(loader)


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_shard_is_named(png_copy: Path, workers: int) -> None:
    shard = png_copy / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    with WdsLoader(config(png_copy, workers=workers)) as loader, pytest.raises(ShardError) as info:
        epoch(loader)
    assert str(info.value).startswith(f"{shard}: got 5000 of "), "the reader's own message, not a traceback"


def test_undecodable_image_names_shard_and_key(png_copy: Path) -> None:
    index = parse_index((png_copy / "train-000000.idx").read_text(), "train-000000.tar", "png")
    shard = png_copy / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    start = int(index.image_offset[3])
    data[start : start + int(index.image_size[3])] = b"\0" * int(index.image_size[3])
    shard.write_bytes(bytes(data))
    expected = rf"train-000000\.tar: sample {index.keys[3]}: cannot decode"
    # the manifest is left as it was: only with verification off does the image reach the decoder
    unverified = config(png_copy, train=False, options={"keys": True, "verify": False})
    with WdsLoader(unverified) as loader, pytest.raises(ShardError, match=expected):
        epoch(loader)
    with WdsLoader(config(png_copy, train=False)) as loader, pytest.raises(ShardError, match="is corrupt"):
        epoch(loader)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"colour": 1}, r"unknown wds option 'colour'; accepted: augment_at, decode, keys"),
        ({"decode": "pil"}, r"decode='pil' for raw shards; accepted: auto, gather, numpy"),
        ({"shuffle_buffer": -1}, r"shuffle_buffer=-1; accepted: an integer >= 0"),
        ({"verify": "maybe"}, r"verify='maybe'; accepted: true, false"),
        ({"augment_at": "gpu"}, r"augment_at='gpu'; accepted: auto, reader, device"),
    ],
)
def test_bad_options_name_the_value_and_the_accepted_set(
    coded: dict[int, Path], options: dict, message: str
) -> None:
    with pytest.raises(FeedrateError, match=message):
        WdsLoader(config(coded[1], options=options))


def test_through_the_factory_and_without_keys(coded: dict[int, Path]) -> None:
    loader = make_loader("wds", config(coded[2], options={"verify": "true"}, train=False))
    batches = list(loader)
    assert sum(len(y) for _, y in batches) == TRAIN and len(batches) == len(loader)
    with pytest.raises(FeedrateError, match="keys=True"):
        next(loader.iter_keyed())


def test_parse_labels_vectorised() -> None:
    buf = memoryview(bytearray(b"7..12..3..x"))
    labels, bad = parse_labels(buf, np.array([0, 3, 7]), np.array([1, 2, 1]))
    assert labels.tolist() == [7, 12, 3] and bad == -1
    assert parse_labels(buf, np.array([0, 10]), np.array([1, 1]))[1] == 1


# -- decoders, reader threads ----------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_every_decoder_gives_pil_pixels(tmp_path: Path, fmt: str) -> None:
    from PIL import Image

    rng = np.random.default_rng(3)
    smooth = rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8).repeat(8, axis=1).repeat(8, axis=2)
    encoded = []
    for image in smooth:
        out = io.BytesIO()
        Image.fromarray(image).save(out, "JPEG" if fmt == "jpg" else "PNG", quality=95, subsampling=0)
        encoded.append(out.getvalue())
    buffer = memoryview(bytearray(b"".join(encoded)))
    sizes = np.array([len(e) for e in encoded])
    parts = [(buffer, np.concatenate([[0], np.cumsum(sizes)[:-1]]), sizes)]
    reference = DECODERS[(fmt, "pil")](parts)
    for choice in decode_choices(fmt):
        images = DECODERS[(fmt, choice)](parts)
        assert images.shape == (6, 32, 32, 3) and images.dtype == torch.uint8, choice
        assert torch.equal(images, reference), f"{choice} decodes {fmt} to PIL's pixels"
    assert DECODERS[(fmt, "auto")].name == ("simplejpeg" if fmt == "jpg" else "opencv")


def test_reader_threads_take_turns_whatever_their_speed(coded: dict[int, Path], monkeypatch) -> None:
    def run() -> list[str]:
        with WdsLoader(config(coded[5], workers=2, batch_size=2, options={"keys": True})) as loader:
            return epoch(loader, 1)[0]

    steady = run()
    real = streaming.load_unit
    delays = iter(np.random.default_rng(0).uniform(0, 0.05, 100).tolist())

    def jittery(*args, **kw):  # type: ignore[no-untyped-def]
        time.sleep(next(delays))  # the readers finish their shards in a different order each time
        return real(*args, **kw)

    monkeypatch.setattr(streaming, "load_unit", jittery)
    assert run() == steady, "batches are taken from the readers in a fixed turn, not first-come"


def test_round_robin_order_and_a_reader_failure() -> None:
    def job(tag: str, n: int, fail: bool = False):  # type: ignore[no-untyped-def]
        def messages():  # type: ignore[no-untyped-def]
            for i in range(n):
                time.sleep(0.01 if tag == "a" else 0)
                yield f"{tag}{i}", torch.get_num_threads()
            if fail:
                raise ShardError(f"reader {tag} failed")

        return messages

    threads = ReaderThreads([job("a", 3), job("b", 1), job("c", 2)], depth=1)
    got = list(threads)
    assert [m for m, _ in got] == ["a0", "b0", "c0", "a1", "c1", "a2"]
    assert {n for _, n in got} == {1}, "one torch thread per reader"
    threads.stop()
    threads.stop()
    failing = ReaderThreads([job("a", 2), job("b", 5, fail=True)], depth=1)
    with pytest.raises(ShardError, match="reader b failed"):
        list(failing)


FRESH_CONSUMER = """
import torch
from loaders.handoff import ReaderThreads
torch.set_num_threads(2)  # nothing has run a parallel op in this thread yet
print(sorted(ReaderThreads([lambda: iter([1, 2]), lambda: iter([3])], 2)), torch.get_num_threads())
"""


def test_readers_leave_a_fresh_consumers_torch_threads_alone() -> None:
    """torch takes the last thread count set anywhere as the count of a thread that has not run a
    parallel op yet: without the consumer's count fixed first, a reader's set_num_threads(1) became the
    training loop's. A fresh process, so the consumer has run no op."""
    assert fresh_process_output(FRESH_CONSUMER) == ["[1,", "2,", "3]", "2"]


def test_workers_are_threads_that_leave_the_consumer_alone(coded: dict[int, Path]) -> None:
    before = torch.get_num_threads()
    with WdsLoader(config(coded[5], workers=2)) as loader:
        next(iter(loader))
        assert [t.name for t in threading.enumerate()].count("wds-reader-0") <= 1
        assert torch.get_num_threads() == before, "readers set their own torch thread count, not ours"
        assert Counter(epoch(loader, 1)[0]) == Counter(all_keys()), "the abandoned pass stopped first"
    assert not [t for t in threading.enumerate() if t.name.startswith("wds-reader")], "close() stops them"


def _requests_reach(loader: WdsLoader, before: int, at_least: int, wait_s: float = 5.0) -> int:
    """The loader's shard reads since `before`, once they reach `at_least` (reads ahead run in fetch
    threads) or `wait_s` has passed."""
    deadline = time.monotonic() + wait_s
    while (reads := loader.stats()["requests"] - before) < at_least and time.monotonic() < deadline:
        time.sleep(0.01)
    return reads


@pytest.mark.parametrize("last", [None, 2])
def test_nothing_is_read_ahead_past_the_last_epoch_said(tmp_path: Path, last: int | None) -> None:
    """train.py numbers its epochs 1..--epochs and says the last (LoaderConfig.last_epoch): epoch 1
    still reads ahead into epoch 2, and epoch 2 into nothing, so each shard is read once per epoch;
    unsaid, epoch 2 reads ahead as usual. 8 shards of 10, 2 readers, each reading 2 ahead at most."""
    data = build_coded(tmp_path / "ds", "raw", shard_size=10, train=80)
    options = {"keys": True, "shuffle_buffer": 8}
    with WdsLoader(config(data, workers=2, options=options, last_epoch=last)) as loader:
        before = loader.stats()["requests"]
        assert Counter(epoch(loader, 1)[0]) == Counter(all_keys(80))
        assert 8 < _requests_reach(loader, before, 9) <= 8 + 2 * 2, "epoch 1 read ahead into epoch 2"
        assert Counter(epoch(loader, 2)[0]) == Counter(all_keys(80))
        if last == 2:
            time.sleep(0.3)  # a read ahead, had one been started, would have begun by now
            assert loader.stats()["requests"] - before == 16
        else:
            assert 16 < _requests_reach(loader, before, 17) <= 16 + 2 * 2


def test_local_read_ahead_reads_only_the_next_epochs_first_units(tmp_path: Path) -> None:
    """Reading ahead from local disk (on by default): each epoch reads every shard once, and what it
    reads early of the next epoch is at most the units each reader's buffer needs before its first draw
    (buffer 8 + batch 4 = 12 samples: 2 units of 10 per reader), never a whole epoch more."""
    data = build_coded(tmp_path / "ds", "raw", shard_size=10, train=80)
    for read_ahead in (True, False):
        options = {"keys": True, "shuffle_buffer": 8, "read_ahead": read_ahead}
        with WdsLoader(config(data, workers=2, options=options)) as loader:
            before = loader.stats()["requests"]  # the index reads made when it was built
            for e in range(3):
                assert Counter(epoch(loader, e)[0]) == Counter(all_keys(80))
                reads = loader.stats()["requests"] - before
                early = 2 * 2 if read_ahead else 0
                assert 8 * (e + 1) <= reads <= 8 * (e + 1) + early, (read_ahead, e, reads)
