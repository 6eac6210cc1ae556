"""Bad data in real shards, read by the wds loader (and the DALI loader, as far as its reader can): a
corrupt or truncated shard, a sample without its label, a label that is not an integer (or not a class),
an image that does not decode, and a manifest that does not match the shards.

Each is an error that names the shard and the sample's key; with the `skip_bad` option the bad samples
are left out instead, counted in stats()["skipped"] and named on stderr, and every other sample is still
read exactly once (per epoch, yielded + skipped = the split's samples).

The shards are edited as tar files and re-indexed with shardgen's own indexer; the manifest is brought
in line with the edit, so each test breaks exactly one thing.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from encoded import decode_identity

from feedrate.manifest import MANIFEST_NAME
from feedrate.shardformat import ShardError, parse_index, write_index
from loaders import LoaderConfig, make_loader
from loaders.streaming import WdsLoader
from tests.helpers import needs_dali

N_TRAIN, SHARD = 40, 10
Members = list[tuple[str, bytes]]


@pytest.fixture
def root(make_encoded_dataset, tmp_path: Path) -> Path:
    """A private copy of a lossless png dataset: 40 training samples in 4 shards of 10."""
    return Path(
        shutil.copytree(
            make_encoded_dataset(fmt="png", n_train=N_TRAIN, n_test=10, shard_size=SHARD), tmp_path / "ds"
        )
    )


def members(shard: Path) -> Members:
    with tarfile.open(shard) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]  # type: ignore[union-attr]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sync_manifest(root: Path, name: str) -> None:
    """The manifest's size and sha256 of shard `name` and its index, as they are now on disk."""
    path = root / MANIFEST_NAME
    doc = json.loads(path.read_text())
    for split in doc["splits"].values():
        for shard in split["shards"]:
            if shard["name"] == name:
                tar, idx = root / name, root / shard["index"]["name"]
                shard.update(bytes=tar.stat().st_size, sha256=sha256(tar))
                shard["index"].update(bytes=idx.stat().st_size, sha256=sha256(idx))
    path.write_text(json.dumps(doc, indent=2))


def rewrite(root: Path, name: str, edit: Callable[[Members], Members]) -> None:
    """Shard `name` rewritten with `edit(members)`, re-indexed, and the manifest made to match."""
    shard = root / name
    new = edit(members(shard))
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in new:
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    write_index(shard, shard.with_suffix(".idx"))
    sync_manifest(root, name)


def key_at(root: Path, name: str, position: int) -> str:
    return members(root / name)[2 * position][0].split(".")[0]


def all_keys() -> set[str]:
    return {f"train_{i:06d}" for i in range(N_TRAIN)}


def config(root: Path, skip: bool = False, **kw: object) -> LoaderConfig:
    options = {"keys": True, "skip_bad": skip} | kw.pop("options", {})  # type: ignore[operator]
    settings: dict = {"split": "train", "batch_size": 8, "train": True, "workers": 0} | kw
    return LoaderConfig(data=str(root), options=options, **settings)


def epoch(loader: WdsLoader, e: int = 0) -> list[str]:
    loader.set_epoch(e)
    return [k for _, _, keys in loader.iter_keyed() for k in keys]


def check_skipped(loader: WdsLoader, bad: set[str], epochs: int = 2, skipped: int | None = None) -> None:
    """Every good sample exactly once per epoch, and the bad ones counted, epoch after epoch."""
    for e in range(epochs):
        keys = epoch(loader, e)
        assert Counter(keys) == Counter(all_keys() - bad), f"epoch {e}"
        assert loader.stats()["skipped"] == (e + 1) * (len(bad) if skipped is None else skipped)


# -- a sample's members ---------------------------------------------------------------------------------
def test_a_sample_without_its_label(root: Path, capfd: pytest.CaptureFixture[str]) -> None:
    bad = key_at(root, "train-000001.tar", 3)
    rewrite(root, "train-000001.tar", lambda ms: [m for m in ms if m[0] != f"{bad}.cls"])
    with pytest.raises(ShardError, match=rf"train-000001\.tar: sample {bad} lacks a \.png or \.cls member"):
        WdsLoader(config(root))
    with WdsLoader(config(root, skip=True)) as loader:
        check_skipped(loader, {bad})
    err = capfd.readouterr().err
    assert f"train-000001.tar ({bad}): it lacks a .png or .cls member" in err, err


@pytest.mark.parametrize(
    ("label", "reason"), [(b"x7", "the .cls member is not an integer"), (b"42", "label 42 is outside 0..9")]
)
@pytest.mark.parametrize("workers", [0, 2])
def test_a_label_that_is_not_a_class(
    root: Path, label: bytes, reason: str, workers: int, capfd: pytest.CaptureFixture[str]
) -> None:
    bad = key_at(root, "train-000002.tar", 5)
    rewrite(root, "train-000002.tar", lambda ms: [(n, label if n == f"{bad}.cls" else d) for n, d in ms])
    with (
        WdsLoader(config(root, workers=workers)) as loader,
        pytest.raises(ShardError, match=rf"train-000002\.tar: sample {bad}: {reason}"),
    ):
        epoch(loader)
    with WdsLoader(config(root, skip=True, workers=workers)) as loader:
        check_skipped(loader, {bad})
    assert f"train-000002.tar ({bad}): {reason}" in capfd.readouterr().err


def test_an_image_that_does_not_decode(root: Path, capfd: pytest.CaptureFixture[str]) -> None:
    bad = key_at(root, "train-000000.tar", 7)
    rewrite(root, "train-000000.tar", lambda ms: [(n, b"\0" * 64 if n == f"{bad}.png" else d) for n, d in ms])
    with (
        WdsLoader(config(root)) as loader,
        pytest.raises(ShardError, match=rf"train-000000\.tar: sample {bad}: cannot decode"),
    ):
        epoch(loader)
    with WdsLoader(config(root, skip=True)) as loader:
        check_skipped(loader, {bad})
    assert f"train-000000.tar ({bad}): cannot decode" in capfd.readouterr().err


# -- whole shards ----------------------------------------------------------------------------------------
def test_a_truncated_shard_keeps_the_samples_that_arrived(
    root: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    shard = root / "train-000003.tar"
    data = shard.read_bytes()
    cut = len(data) // 2
    shard.write_bytes(data[:cut])  # the manifest still promises the whole shard
    index = parse_index((root / "train-000003.idx").read_text(), shard.name, "png")
    ends = np.maximum(index.image_offset + index.image_size, index.label_offset + index.label_size)
    lost = [k for k, end in zip(index.keys, ends.tolist(), strict=True) if end > cut]
    assert 0 < len(lost) < SHARD
    with WdsLoader(config(root)) as loader, pytest.raises(ShardError) as info:
        epoch(loader)
    assert str(info.value) == (
        f"{shard}: got {cut} of {len(data)} bytes (truncated or replaced shard); "
        f"sample {lost[0]} and {len(lost) - 1} more did not arrive whole"
    )
    # With verification off, the samples that arrived whole are used.
    with WdsLoader(config(root, skip=True, options={"verify": False})) as loader:
        check_skipped(loader, set(lost))
    named = ", ".join(lost[:3]) + (", ..." if len(lost) > 3 else "")
    assert f"train-000003.tar ({named}): its bytes did not all arrive" in capfd.readouterr().err
    # Verified reading (the default) uses nothing it cannot check: the whole shard is skipped.
    with WdsLoader(config(root, skip=True)) as loader:
        check_skipped(loader, set(index.keys), epochs=1)
    assert "(truncated or replaced shard); unverifiable" in capfd.readouterr().err


def shard_keys(shard: Path) -> set[str]:
    """The keys of a shard's samples, from its index (the shard itself may be damaged)."""
    return set(parse_index(shard.with_suffix(".idx").read_text(), shard.name, "png").keys)


def test_a_corrupt_shard_under_verify(root: Path, capfd: pytest.CaptureFixture[str]) -> None:
    shard = root / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))
    lost = shard_keys(shard)
    with (
        WdsLoader(config(root, options={"verify": True})) as loader,
        pytest.raises(ShardError, match=r"train-000001\.tar is corrupt: sha256"),
    ):
        epoch(loader)
    with WdsLoader(config(root, skip=True, options={"verify": True})) as loader:
        check_skipped(loader, lost)
    assert (
        "skipped 10 sample(s) of " in (err := capfd.readouterr().err)
        and "train-000001.tar: is corrupt" in err
    )


def test_a_manifest_that_does_not_match_the_shards(root: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The manifest counts 11 samples in a shard whose index lists 10."""
    path = root / MANIFEST_NAME
    doc = json.loads(path.read_text())
    doc["splits"]["train"]["shards"][2]["samples"] += 1
    doc["splits"]["train"]["samples"] += 1
    path.write_text(json.dumps(doc))
    with pytest.raises(
        ShardError, match=r"train-000002\.idx lists 10 samples; the manifest says train-000002\.tar holds 11"
    ):
        WdsLoader(config(root))
    lost = shard_keys(root / "train-000002.tar")
    with WdsLoader(config(root, skip=True)) as loader:
        assert loader.samples == N_TRAIN + 1
        check_skipped(loader, lost, skipped=SHARD + 1)
    assert "the manifest does not match the shards" in capfd.readouterr().err


def test_skip_bad_through_the_factory_from_a_command_line_string(root: Path) -> None:
    bad = key_at(root, "train-000001.tar", 0)
    rewrite(root, "train-000001.tar", lambda ms: [(n, b"?" if n == f"{bad}.cls" else d) for n, d in ms])
    loader = make_loader("wds", config(root, options={"skip_bad": "true", "keys": False}, train=False))
    assert sum(len(y) for _, y in loader) == N_TRAIN - 1
    assert loader.stats()["skipped"] == 1
    with pytest.raises(Exception, match=r"skip_bad='maybe'; accepted: true, false"):
        make_loader("wds", config(root, options={"skip_bad": "maybe"}))


# -- the DALI loader: what its reader can skip, and naming what it cannot ---------------------------------


def dali_epoch(root: Path, skip: bool, e: int = 0) -> tuple[list[int], int]:
    """Sample ids of one DALI epoch (read back from the pixels), and the loader's skipped count."""
    cfg = LoaderConfig(
        data=str(root), split="train", batch_size=8, train=True, workers=1, options={"skip_bad": skip}
    )
    loader = make_loader("dali", cfg)
    ids: list[int] = []
    for epoch_no in range(e + 1):
        loader.set_epoch(epoch_no)
        ids = [i for images, _ in loader for i in decode_identity(images)[0]]
    return ids, loader.stats()["skipped"]


@needs_dali
def test_dali_skips_a_sample_without_its_label(root: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from loaders.dali_pipe import DaliError

    bad = key_at(root, "train-000001.tar", 3)
    rewrite(root, "train-000001.tar", lambda ms: [m for m in ms if m[0] != f"{bad}.cls"])
    with pytest.raises(DaliError, match=rf"train-000001\.tar: sample {bad} lacks a \.png or \.cls member"):
        dali_epoch(root, skip=False)
    ids, skipped = dali_epoch(root, skip=True, e=1)
    assert Counter(ids) == Counter(set(range(N_TRAIN)) - {int(bad.rsplit("_", 1)[1])}) and skipped == 2
    assert "dali: skipped 1 sample(s) of " in capfd.readouterr().err


@needs_dali
def test_dali_skips_a_label_that_is_not_an_integer(root: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from loaders.dali_pipe import DaliError

    bad = key_at(root, "train-000002.tar", 4)
    rewrite(root, "train-000002.tar", lambda ms: [(n, b"x7" if n == f"{bad}.cls" else d) for n, d in ms])
    with pytest.raises(
        DaliError, match=rf"train-000002\.tar: sample {bad}: the \.cls member is not an integer"
    ):
        dali_epoch(root, skip=False)
    ids, skipped = dali_epoch(root, skip=True)
    assert Counter(ids) == Counter(set(range(N_TRAIN)) - {int(bad.rsplit("_", 1)[1])}) and skipped == 1
    assert "a .cls member holds b'x7'" in capfd.readouterr().err


@needs_dali
def test_dali_names_an_image_that_does_not_decode_even_when_skipping(root: Path) -> None:
    """DALI's decoders have no per-sample error policy: an undecodable image stays an error, named."""
    from loaders.dali_pipe import DaliError

    bad = key_at(root, "train-000000.tar", 6)
    rewrite(root, "train-000000.tar", lambda ms: [(n, b"\0" * 64 if n == f"{bad}.png" else d) for n, d in ms])
    for skip in (False, True):
        with pytest.raises(DaliError, match=rf"train-000000\.tar: sample {bad}: cannot decode"):
            dali_epoch(root, skip=skip)


def test_train_py_skip_bad_counts_and_reports(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """train.py --skip-bad: the run completes, run.json counts the skipped sample, the summary says so;
    without the flag the same data is a one-line error naming the shard and key (exit 2)."""
    import train

    bad = key_at(root, "train-000002.tar", 1)
    rewrite(root, "train-000002.tar", lambda ms: [(n, b"x7" if n == f"{bad}.cls" else d) for n, d in ms])
    common = [
        "--loader",
        "wds",
        "--data",
        str(root),
        "--arch",
        "small",
        "--batch-size",
        "8",
        "--workers",
        "0",
    ]
    with pytest.raises(SystemExit) as failed:
        train.main([*common, "--out", str(tmp_path / "strict")])
    assert failed.value.code == 2
    err = capsys.readouterr().err
    assert "train-000002.tar" in err and bad in err
    assert train.main([*common, "--skip-bad", "--out", str(tmp_path / "lenient")]) == 0
    out = capsys.readouterr().out
    doc = json.loads((tmp_path / "lenient" / "run.json").read_text())
    assert doc["status"] == "complete"
    assert doc["counters"]["train"]["skipped"] == 1
    assert doc["epochs"][0]["train"]["samples"] == N_TRAIN - 1
    assert "1 bad samples skipped" in out
