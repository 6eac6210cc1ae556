"""The DALI loader through DALI's real CPU pipeline, on real shards (local disk and the local S3 server).

The lossless datasets here draw every image as flat colour planes that name the sample: red = index
mod 256, green = index div 256, blue = label. Crop-pad-4 keeps the centre pixel inside the image and a
flip keeps it too, so every yielded pair can be traced back to its sample, augmented or not.
"""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from feedrate.cifar import BATCH_DIR, write_batch_dir
from feedrate.errors import FeedrateError
from feedrate.shardformat import ShardError
from loaders import CIFAR10_MEAN, CIFAR10_STD, Loader, LoaderConfig, make_loader
from loaders.dali_pipe import DaliError, DaliOptions, parse_labels
from loaders.dali_state import rank_part
from shardgen import ShardgenConfig, build
from tests.helpers import needs_dali

NUM_CLASSES = 120  # labels of one, two and three digits
MEAN = torch.tensor(CIFAR10_MEAN)[:, None, None]
STD = torch.tensor(CIFAR10_STD)[:, None, None]


def label_of(index: np.ndarray | int) -> np.ndarray | int:
    return (index * 7 + 3) % NUM_CLASSES


def flat_images(count: int) -> np.ndarray:
    index = np.arange(count)
    images = np.empty((count, 32, 32, 3), dtype=np.uint8)
    images[..., 0] = (index % 256)[:, None, None]
    images[..., 1] = (index // 256)[:, None, None]
    images[..., 2] = label_of(index)[:, None, None]
    return images


def gradient_images(count: int) -> np.ndarray:
    """Red names the sample; green and blue grow along x and y, so a shift or a flip shows."""
    images = np.empty((count, 32, 32, 3), dtype=np.uint8)
    images[..., 0] = np.arange(count)[:, None, None]
    images[..., 1] = (8 * np.arange(32) + 4)[None, None, :]
    images[..., 2] = (8 * np.arange(32) + 4)[None, :, None]
    return images


def write_dataset(root: Path, images: np.ndarray, fmt: str, shard_size: int, num_classes: int) -> Path:
    """`images` as the training split (labels from `label_of`) through shardgen's `--source PATH`."""
    labels = np.asarray(label_of(np.arange(len(images))), dtype=np.int64) % num_classes
    source = root / "source" / BATCH_DIR
    splits = {"train": (images, labels), "test": (images[:7], labels[:7])}
    write_batch_dir(source, splits, [f"class{i}" for i in range(num_classes)], label="test")
    dest = root / "ds"
    build(
        ShardgenConfig(
            dest=str(dest), source=str(source), fmt=fmt, shard_size=shard_size, allow_download=False
        )
    )
    return dest


@pytest.fixture(scope="session")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Lossless sets of 53 samples: raw in 1, 2 and 5 shards, png in 5 (11+11+11+11+9)."""
    made = {}
    for name, fmt, shard_size in (
        ("raw1", "raw", 53),
        ("raw2", "raw", 27),
        ("raw5", "raw", 11),
        ("png5", "png", 11),
    ):
        made[name] = write_dataset(
            tmp_path_factory.mktemp(name), flat_images(53), fmt, shard_size, NUM_CLASSES
        )
    made["grad"] = write_dataset(
        tmp_path_factory.mktemp("grad"), gradient_images(200), "raw", 100, NUM_CLASSES
    )
    return made


def synthetic_jpg(root: Path, n_test: int, shard_size: int) -> Path:
    """A synthetic jpg dataset whose test split (n_test samples) the decode tests read."""
    build(
        ShardgenConfig(
            dest=str(root),
            source="synthetic",
            fmt="jpg",
            shard_size=shard_size,
            synthetic_train=5,
            synthetic_test=n_test,
            allow_download=False,
        )
    )
    return root


def dali(data: str | Path, split: str = "train", **kwargs: object) -> Loader:
    settings: dict = {"batch_size": 8, "train": split == "train", "workers": 1} | kwargs
    return make_loader("dali", LoaderConfig(data=str(data), split=split, **settings))


def pixels(images: torch.Tensor) -> torch.Tensor:
    """Normalised float images back to 0-255 integers."""
    return torch.round(images * STD * 255 + MEAN * 255).to(torch.int64)


def identities(images: torch.Tensor) -> torch.Tensor:
    centre = pixels(images[:, :, 16, 16][:, :, None, None])[:, :, 0, 0]
    return centre[:, 0] + 256 * centre[:, 1]


def run_epoch(loader: Loader) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Images, labels and batch sizes of one whole epoch."""
    xs, ys = [], []
    for x, y in loader:
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32) and y.dtype == torch.int64
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys), [len(y) for y in ys]


@needs_dali
@pytest.mark.parametrize("name", ["raw1", "raw2", "raw5", "png5"])
def test_every_sample_once_per_epoch_with_its_own_label(datasets: dict[str, Path], name: str) -> None:
    ld = dali(datasets[name], seed=3)
    assert isinstance(ld, Loader)
    assert (ld.samples, len(ld), ld.decode_device, ld.downloads) == (53, 7, "cpu", [])
    orders = []
    for e in (1, 2, 3):
        ld.set_epoch(e)
        images, labels, sizes = run_epoch(ld)
        assert sizes == [8] * 6 + [5]  # partial last batch, never padded with repeats
        ids = identities(images)
        assert sorted(ids.tolist()) == list(range(53))
        assert torch.equal(labels, torch.as_tensor(label_of(ids.numpy())))
        assert torch.equal(labels, pixels(images)[:, 2, 16, 16])  # the label drawn into the image
        orders.append(ids.tolist())
    assert orders[0] != list(range(53)) and orders[0] != orders[1]  # shuffled, anew each epoch


@needs_dali
@pytest.mark.parametrize(("name", "world"), [("raw5", 3), ("raw2", 2), ("raw1", 4)])
@pytest.mark.parametrize("train", [True, False])
def test_ranks_read_disjoint_parts_that_cover_the_split(
    datasets: dict[str, Path], name: str, world: int, train: bool
) -> None:
    ranks = [dali(datasets[name], train=train, rank=r, world_size=world, batch_size=4) for r in range(world)]
    assert [ld.samples for ld in ranks] == [rank_part(53, r, world)[0] for r in range(world)]
    assert sum(ld.samples for ld in ranks) == 53
    for e in (1, 2):
        seen: list[int] = []
        for ld in ranks:
            ld.set_epoch(e)
            images, labels, sizes = run_epoch(ld)
            assert len(sizes) == len(ld) and sum(sizes) == ld.samples
            ids = identities(images)
            assert torch.equal(labels, torch.as_tensor(label_of(ids.numpy())))
            seen += ids.tolist()
        assert sorted(seen) == list(range(53))


@needs_dali
def test_evaluation_is_the_stored_order_without_augmentation(datasets: dict[str, Path]) -> None:
    ld = dali(datasets["raw5"], train=False)
    first, labels, _ = run_epoch(ld)
    again, _, _ = run_epoch(ld)
    assert torch.equal(first, again)
    ids = identities(first)
    want = torch.from_numpy(flat_images(53)[ids.numpy()]).permute(0, 3, 1, 2)
    assert torch.equal(pixels(first), want)  # every pixel: nothing cropped, padded or flipped
    assert torch.equal(labels, torch.as_tensor(label_of(ids.numpy())))


@needs_dali
def test_augmentation_is_a_zero_padded_crop_and_a_flip(datasets: dict[str, Path]) -> None:
    """Each output is exactly one of the 162 crop-pad-4 x flip variants of its source image."""
    ld = dali(datasets["grad"], batch_size=64, seed=1)
    images, _, _ = run_epoch(ld)
    source = torch.from_numpy(gradient_images(200)).permute(0, 3, 1, 2).to(torch.int64)
    padded = torch.nn.functional.pad(source, (4, 4, 4, 4))  # zeros, as RandomCrop(32, padding=4)
    got = pixels(images)
    used = set()
    for out in got:
        src = padded[int(out[0, 16, 16])]
        windows = {(dy, dx): src[:, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)}
        match = [
            (dy, dx, flip)
            for (dy, dx), window in windows.items()
            for flip in (False, True)
            if torch.equal(out, window.flip(-1) if flip else window)
        ]
        assert match, "an output that no crop/flip of its source explains"
        used.add(match[0])
    flips = {m[2] for m in used}
    assert flips == {False, True} and len({m[:2] for m in used}) > 20  # all kinds of offsets, both flips


@needs_dali
def test_the_cpu_augmentation_is_fixed_by_the_seed(datasets: dict[str, Path]) -> None:
    """On the CPU the batch is cropped and flipped by torch, each sample as the epoch's table says
    (loaders.augment.EpochDraws, from (seed, epoch)): the same seed gives the same epoch pixel for pixel;
    another epoch or seed gives others."""
    epochs = {}
    for seed, epoch in ((1, 0), (1, 0), (1, 1), (2, 0)):
        ld = dali(datasets["grad"], batch_size=64, seed=seed)
        ld.set_epoch(epoch)
        epochs.setdefault((seed, epoch), []).append(run_epoch(ld)[0])
    (first, again), other_epoch, other_seed = epochs[(1, 0)], epochs[(1, 1)][0], epochs[(2, 0)][0]
    assert torch.equal(first, again)
    by_id = {int(i): x for i, x in zip(pixels(first)[:, 0, 16, 16], first, strict=True)}
    for images in (other_epoch, other_seed):
        moved = sum(not torch.equal(by_id[int(pixels(x[None])[0, 0, 16, 16])], x) for x in images)
        assert moved > len(images) // 2, "a new epoch or seed draws new crops and flips"


@needs_dali
def test_the_cpu_augmentation_leaves_torchs_threads_as_they_were(datasets: dict[str, Path]) -> None:
    """The batch ops run on one torch thread (DALI's threads hold the cores); the caller's count stands
    between batches and afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ld = dali(datasets["raw5"], seed=4)
        for _ in ld:
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@needs_dali
def test_jpg_decodes_close_to_pil(tmp_path: Path) -> None:
    root = synthetic_jpg(tmp_path / "jpg", n_test=60, shard_size=40)
    images, labels, _ = run_epoch(dali(root, split="test"))
    want_x, want_y = [], []
    for shard in sorted(root.glob("test-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                if member.name.endswith(".jpg"):
                    want_x.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
                else:
                    want_y.append(int(data))
    assert labels.tolist() == want_y
    pil = torch.from_numpy(np.stack(want_x)).permute(0, 3, 1, 2).to(torch.int64)
    diff = (pixels(images) - pil).abs().float()
    assert diff.mean() < 1.0 and diff.max() <= 16  # different IDCTs, the same image


@needs_dali
@pytest.mark.parametrize("scheme", ["s3", "cos"])
def test_remote_shards_are_fetched_once_then_read_locally(
    tiny_dataset: Path, s3_env, bucket: str, tmp_path: Path, scheme: str
) -> None:
    from feedrate.storage import open_store

    store = open_store(f"{scheme}://{bucket}/ds")
    for path in sorted(tiny_dataset.rglob("*")):
        if path.is_file():
            store.put_file(path, path.relative_to(tiny_dataset).as_posix())
    shards = len(list(tiny_dataset.glob("train-*.tar")))
    prefix = f"/{bucket}/ds/"
    before = len(s3_env.requests("GET", prefix))
    ld = dali(f"{scheme}://{bucket}/ds", batch_size=64, cache_dir=str(tmp_path / "cache"))
    assert [(d.split, d.samples) for d in ld.downloads] == [("train", 600)]
    assert ld.downloads[0].duration >= ld.downloads[0].loading > 0
    labels = []
    for e in (1, 2):
        ld.set_epoch(e)
        labels.append(run_epoch(ld)[1])
    local = run_epoch(dali(tiny_dataset, batch_size=64))[1]
    assert sorted(labels[0].tolist()) == sorted(labels[1].tolist()) == sorted(local.tolist())
    gets = s3_env.requests("GET", prefix)[before:]
    assert len(gets) <= 2 * shards + 3, gets  # a tar and an index per shard, the manifest, no more
    assert ld.stats()["cache_misses"] == 2 * shards
    # A second loader finds every file in the cache, verified by sha256: no shard is fetched again.
    again = dali(f"{scheme}://{bucket}/ds", batch_size=64, cache_dir=str(tmp_path / "cache"))
    assert again.stats()["cache_hits"] == 2 * shards and again.stats()["cache_misses"] == 0
    assert not [
        g for g in s3_env.requests("GET", prefix)[before + len(gets) :] if g.endswith((".tar", ".idx"))
    ]


@needs_dali
def test_an_abandoned_epoch_does_not_leak_into_the_next(datasets: dict[str, Path]) -> None:
    ld = dali(datasets["raw5"], seed=5)
    batches = iter(ld)
    next(batches)
    next(batches)
    batches.close()  # as train.py does with --max-batches
    ld.set_epoch(2)
    images, _, sizes = run_epoch(ld)
    assert sorted(identities(images).tolist()) == list(range(53)) and len(sizes) == len(ld)


@needs_dali
def test_a_batch_larger_than_the_split(datasets: dict[str, Path]) -> None:
    ld = dali(datasets["raw2"], batch_size=256)
    assert len(ld) == 1
    for _ in range(2):
        images, _, sizes = run_epoch(ld)
        assert sizes == [53] and sorted(identities(images).tolist()) == list(range(53))


def test_labels_parse_as_integers_of_up_to_six_digits() -> None:
    rows = [b"7", b"12", b"0", b"119", b"999999"]
    width = max(len(r) for r in rows) + 2
    padded = np.array([list(r.ljust(width, b"\0")) for r in rows], dtype=np.uint8)
    assert parse_labels(padded, 10**6).tolist() == [7, 12, 0, 119, 999999]
    with pytest.raises(DaliError, match=r"outside the dataset's classes 0\.\.99"):
        parse_labels(padded, 100)
    for bad in (b"3\n", b"", b"x"):
        row = np.array([list(bad.ljust(4, b"\0"))], dtype=np.uint8)
        with pytest.raises(DaliError, match="expected ASCII digits"):
            parse_labels(row, 10)


def test_options_are_validated() -> None:
    assert DaliOptions.from_config({}, workers=0).threads == 2
    assert DaliOptions.from_config({"prefetch": 3}, workers=4) == DaliOptions(threads=4, prefetch=3)
    accepted = "hw_decoder_load, initial_fill, net, prefetch, skip_bad, threads, verify"
    with pytest.raises(FeedrateError, match=f"^unknown dali option 'speed'; accepted: {accepted}$"):
        DaliOptions.from_config({"speed": 1}, workers=2)
    with pytest.raises(FeedrateError, match=r"dali option prefetch=0; accepted: an integer >= 1"):
        DaliOptions.from_config({"prefetch": 0}, workers=2)


def test_a_clear_error_when_dali_is_missing(
    datasets: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [m for m in sys.modules if m == "nvidia.dali" or m.startswith("nvidia.dali.")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import nvidia.dali...` now fails
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(FeedrateError, match=r"needs NVIDIA DALI.*pip install nvidia-dali-cuda120"):
        dali(datasets["raw1"])


@needs_dali
def test_cuda_without_a_gpu_is_refused(datasets: dict[str, Path]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(FeedrateError, match="torch sees no CUDA GPU"):
        dali(datasets["raw1"], device="cuda")


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


@needs_dali
@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", ["raw5", "png5"])
def test_gpu_pipeline_yields_cuda_batches_once_per_epoch(datasets: dict[str, Path], name: str) -> None:
    ld = dali(datasets[name], device="cuda", seed=2)
    assert ld.decode_device == ("cuda" if name.startswith("raw") else "mixed")
    for e in (1, 2):
        ld.set_epoch(e)
        images, labels, sizes = run_epoch(ld)
        assert images.is_cuda and labels.is_cuda and sizes == [8] * 6 + [5]
        ids = identities(images.cpu())
        assert sorted(ids.tolist()) == list(range(53))
        assert torch.equal(labels.cpu(), torch.as_tensor(label_of(ids.numpy())))


@needs_dali
@pytest.mark.gpu
@gpu
def test_gpu_jpg_decode_matches_the_cpu_decode(tmp_path: Path) -> None:
    root = synthetic_jpg(tmp_path / "jpg", n_test=100, shard_size=50)
    on_gpu = dali(root, split="test", device="cuda")
    assert on_gpu.decode_device == "mixed"
    gx, gy, _ = run_epoch(on_gpu)
    cx, cy, _ = run_epoch(dali(root, split="test"))
    assert torch.equal(gy.cpu(), cy)
    assert (pixels(gx.cpu()) - pixels(cx)).abs().float().mean() < 1.0


@needs_dali
def test_a_missing_or_damaged_shard_is_a_clear_error(datasets: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    root = Path(shutil.copytree(datasets["png5"], tmp_path / "ds"))
    (root / "train-000003.idx").unlink()
    with pytest.raises(FeedrateError, match=r"train-000003\.idx is missing; the manifest"):
        dali(root)
    shutil.copy(datasets["png5"] / "train-000003.idx", root)
    # Overwrite the pixels of one png in place (same size: the manifest's size check passes).
    ext, offset, size = (root / "train-000002.idx").read_text().splitlines()[1].split()[4:7]
    assert ext == "png"
    with open(root / "train-000002.tar", "r+b") as f:
        f.seek(int(offset))
        f.write(b"\xff" * int(size))
    # verified (the default), the damage is found before DALI reads a byte
    with pytest.raises(ShardError, match=r"train-000002\.tar is corrupt: sha256"):
        dali(root)
    with pytest.raises(DaliError, match=r"DALI failed on the train shards of .*: fn\.decoders\.image: \S"):
        for _ in dali(root, options={"verify": False}):
            pass
