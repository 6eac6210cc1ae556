"""shardgen: real tar files read back by webdataset, tar and DALI; manifests; remote publishing; bad input."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from feedrate.cifar import read_batch_dir
from feedrate.manifest import MANIFEST_NAME, Manifest
from feedrate.shardformat import write_index
from feedrate.storage import open_store
from shardgen import ShardgenConfig, build

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, N_TEST, SHARD = 230, 70, 50


def _build(dest: str, fmt: str, **kw) -> Manifest:
    cfg = ShardgenConfig(
        dest=dest,
        source="synthetic",
        fmt=fmt,
        shard_size=SHARD,
        synthetic_train=N_TRAIN,
        synthetic_test=N_TEST,
        allow_download=False,
        **kw,
    )
    return build(cfg)


def _decode(data: bytes, fmt: str) -> np.ndarray:
    if fmt == "raw":
        return np.frombuffer(data, np.uint8).reshape(32, 32, 3)
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module", params=["jpg", "png", "raw"])
def built(request, tmp_path_factory) -> tuple[Path, str, Manifest]:
    root = tmp_path_factory.mktemp(f"ds-{request.param}")
    manifest = _build(str(root), request.param)
    return root, request.param, manifest


def test_round_trip_with_webdataset(built) -> None:
    import webdataset as wds

    root, fmt, manifest = built
    splits, _ = read_batch_dir(root / "cifar-10-batches-py")
    for split, entry in manifest.splits.items():
        images, labels = splits[split]
        urls = [str(root / s.name) for s in entry.shards]
        seen = set()
        for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
            index = int(sample["__key__"].split("_")[1])
            assert int(sample["cls"].decode()) == labels[index]
            pixels = _decode(sample[fmt], fmt)
            if fmt == "jpg":
                assert np.abs(pixels.astype(int) - images[index]).mean() < 6
            else:
                np.testing.assert_array_equal(pixels, images[index])
            seen.add(index)
        assert seen == set(range(len(labels))), f"{split}: every sample exactly once"


def test_round_trip_with_tar_cli(built, tmp_path: Path) -> None:
    root, fmt, manifest = built
    shard = manifest.splits["train"].shards[0]
    listing = subprocess.run(
        ["tar", "-tf", str(root / shard.name)], check=True, capture_output=True, text=True
    ).stdout.split()
    assert len(listing) == 2 * shard.samples
    assert {name.split(".", 1)[1] for name in listing} == {fmt, "cls"}
    subprocess.run(["tar", "-xf", str(root / shard.name), "-C", str(tmp_path)], check=True)
    first_key = listing[0].split(".")[0]
    assert (tmp_path / f"{first_key}.cls").read_text().isdigit()


def test_samples_are_shuffled_and_shards_sized(built) -> None:
    root, _, manifest = built
    train = manifest.splits["train"]
    assert [s.samples for s in train.shards] == [50, 50, 50, 50, 30]
    with tarfile.open(root / train.shards[0].name) as tar:
        keys = [int(m.name.split("_")[1].split(".")[0]) for m in tar if m.name.endswith(".cls")]
    assert keys != sorted(keys)


def test_manifest_matches_files(built) -> None:
    root, fmt, manifest = built
    on_disk = Manifest.from_json((root / MANIFEST_NAME).read_text())
    assert on_disk == manifest
    assert manifest.kind == "synthetic" and manifest.encoding == fmt
    assert manifest.splits["train"].samples == N_TRAIN and manifest.splits["test"].samples == N_TEST
    for entry in manifest.splits.values():
        for shard in entry.shards:
            data = (root / shard.name).read_bytes()
            assert len(data) == shard.bytes
            assert hashlib.sha256(data).hexdigest() == shard.sha256
            idx = (root / shard.index.name).read_bytes()
            assert hashlib.sha256(idx).hexdigest() == shard.index.sha256
    for batch in manifest.source_batches:
        data = (root / batch.name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (batch.bytes, batch.sha256)


def test_index_is_what_dali_tool_writes(built, tmp_path: Path) -> None:
    root, _, manifest = built
    tool = Path(sys.executable).with_name("wds2idx")
    if not tool.exists():
        pytest.skip("DALI's wds2idx tool is not installed")
    shard = manifest.splits["test"].shards[0]
    ours = tmp_path / "ours.idx"
    write_index(root / shard.name, ours)
    subprocess.run(
        [str(tool), str(root / shard.name), str(tmp_path / "dali.idx")], check=True, capture_output=True
    )
    assert ours.read_bytes() == (tmp_path / "dali.idx").read_bytes() == (root / shard.index.name).read_bytes()


def test_index_accepted_by_dali_reader(built) -> None:
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def

    root, fmt, manifest = built
    shards = manifest.splits["train"].shards

    @pipeline_def(batch_size=64, num_threads=1, device_id=None)
    def pipe():
        data, label = fn.readers.webdataset(
            paths=[str(root / s.name) for s in shards],
            index_paths=[str(root / s.index.name) for s in shards],
            ext=[fmt, "cls"],
            missing_component_behavior="error",
            name="reader",
        )
        return data, label

    p = pipe()
    p.build()
    assert p.reader_meta("reader")["epoch_size"] == N_TRAIN
    outputs = p.run()
    labels = [bytes(np.array(outputs[1][i])).decode() for i in range(len(outputs[1]))]
    assert all(label.isdigit() for label in labels)


def test_same_seed_gives_identical_shards(tmp_path: Path) -> None:
    a = _build(str(tmp_path / "a"), "png", splits=("test",))
    b = _build(str(tmp_path / "b"), "png", splits=("test",))
    c = _build(str(tmp_path / "c"), "png", splits=("test",), seed=1)
    assert [s.sha256 for s in a.splits["test"].shards] == [s.sha256 for s in b.splits["test"].shards]
    assert [s.sha256 for s in a.splits["test"].shards] != [s.sha256 for s in c.splits["test"].shards]


def test_refuses_to_overwrite_then_replaces_and_prunes(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _build(str(root), "raw")
    before = (root / MANIFEST_NAME).read_bytes()
    result = _cli("--dest", str(root), "--source", "synthetic", "--format", "png")
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert (root / MANIFEST_NAME).read_bytes() == before
    cfg = dict(synthetic_train=60, synthetic_test=20)
    manifest = build(
        ShardgenConfig(dest=str(root), source="synthetic", fmt="png", shard_size=50, overwrite=True, **cfg)
    )
    assert manifest.encoding == "png"
    tars = sorted(p.name for p in root.glob("*.tar"))
    assert tars == ["test-000000.tar", "train-000000.tar", "train-000001.tar"]


def test_publish_to_s3_and_cos(bucket: str, s3_server, tmp_path: Path) -> None:
    for scheme in ("s3", "cos"):
        url = f"{scheme}://{bucket}/cifar-{scheme}"
        manifest = _build(url, "jpg")
        store = open_store(url)
        names = set(store.list())
        for entry in manifest.splits.values():
            for shard in entry.shards:
                assert {shard.name, shard.index.name} <= names
                assert hashlib.sha256(store.read_bytes(shard.name)).hexdigest() == shard.sha256
        assert {b.name for b in manifest.source_batches} <= names
        assert json.loads(store.read_bytes(MANIFEST_NAME))["kind"] == "synthetic"
    puts = s3_server.requests("PUT", f"/{bucket}/cifar-s3/")
    assert puts[-1] == f"PUT /{bucket}/cifar-s3/{MANIFEST_NAME}", "the manifest is written last"


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "shardgen",
            "--no-download",
            "--synthetic-train",
            "40",
            "--synthetic-test",
            "10",
            *args,
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--dest", "ftp://host/x"], "unknown storage scheme 'ftp'"),
        (["--format", "webp"], "unknown format 'webp'; accepted: jpg, png, raw"),
        (["--shard-size", "0"], "--shard-size 0"),
        (["--splits", "train,val"], "unknown split val"),
        (["--source", "/does/not/exist"], "/does/not/exist does not exist"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path: Path, args: list[str], needle: str) -> None:
    dest = tmp_path / "out"
    full = ["--dest", str(dest), "--source", "synthetic", *args]
    result = _cli(*full)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert not (dest / MANIFEST_NAME).exists()
    assert not any(dest.rglob("*.tar")) if dest.exists() else True


def test_unwritable_destination(tmp_path: Path) -> None:
    target = tmp_path / "file-not-dir"
    target.write_text("x")
    result = _cli("--dest", str(target / "ds"), "--source", "synthetic")
    assert result.returncode == 2 and "not writable" in result.stderr


def test_missing_bucket_and_no_credentials(s3_env, tmp_path: Path) -> None:
    result = _cli("--dest", "s3://no-such-bucket-here/x", "--source", "synthetic")
    assert result.returncode == 2
    assert "bucket 'no-such-bucket-here' does not exist" in result.stderr
    env = {k: "" for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    result = _cli("--dest", "s3://whatever/x", "--source", "synthetic", env=env)
    assert result.returncode == 2 and "no credentials" in result.stderr


@pytest.mark.parametrize("scheme", ["s3", "cos"])
def test_wrong_credentials(auth_s3_server, s3_env, scheme: str, tmp_path: Path) -> None:
    _server, good = auth_s3_server
    wrong = {**good, "AWS_SECRET_ACCESS_KEY": "definitely-wrong-secret"}
    dest = f"{scheme}://authed/ds-{scheme}"
    result = _cli("--dest", dest, "--source", "synthetic", env=wrong)
    assert result.returncode == 2
    assert "access denied" in result.stderr and "definitely-wrong-secret" not in result.stderr
    ok = _cli("--dest", dest, "--source", "synthetic", "--shard-size", "25", env=good)
    assert ok.returncode == 0, ok.stderr
    assert good["AWS_SECRET_ACCESS_KEY"] not in ok.stdout + ok.stderr


def test_unreachable_endpoint_fails_in_bounded_time(s3_env) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    result = _cli(
        "--dest", "cos://bucket/x", "--source", "synthetic", "--endpoint-url", f"http://127.0.0.1:{port}"
    )
    assert result.returncode == 2 and "cannot reach the endpoint" in result.stderr
    assert time.monotonic() - started < 60


def test_secret_never_printed(s3_env, tmp_path: Path) -> None:
    secret = "SeCrEt-Value-Never-Print-42"
    result = _cli(
        "--dest", "s3://no-such-bucket-x/x", "--source", "synthetic", env={"AWS_SECRET_ACCESS_KEY": secret}
    )
    assert result.returncode == 2
    assert secret not in result.stderr + result.stdout


def test_interrupted_run_leaves_no_manifest_and_no_temp_files(tmp_path: Path) -> None:
    dest = tmp_path / "ds"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shardgen",
            "--dest",
            str(dest),
            "--source",
            "synthetic",
            "--format",
            "png",
            "--synthetic-train",
            "20000",
            "--synthetic-test",
            "2000",
            "--shard-size",
            "500",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(dest.glob("train-*.tar")):
        time.sleep(0.05)
    assert list(dest.glob("train-*.tar")), "shards should appear before the run is stopped"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert not (dest / MANIFEST_NAME).exists()
    leftovers = [
        p.name for p in dest.rglob("*") if p.name.startswith(".") or p.suffix in (".tmp", ".partial")
    ]
    assert leftovers == []
