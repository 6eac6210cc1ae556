"""A dataset on a shared bucket is someone else's input: it can neither write outside the cache nor run code.

Each test here stands for one finding of the "read the data path as an attacker would" review, and
fails on the code before the fix: manifest names that would become paths outside their directory, a
CIFAR batch whose unpickling would run code, labels coerced into other classes, sizes that allocate
before a byte arrives, URLs whose secrets or parts slipped through, and a server that ignores `Range`.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from feedrate import files
from feedrate.cifar import BATCH_DIR, SourceError, read_batch
from feedrate.manifest import MANIFEST_NAME, Manifest, ManifestError
from feedrate.storage import LocalStore, StorageError, open_store, redact_url
from loaders import LoaderConfig, make_loader
from rig import locals3
from rig.netproxy import Exchange, Fault, NetProxy, Reset
from shardgen import source

REPO = Path(__file__).resolve().parent.parent


def manifest_doc(root: Path) -> dict:
    return json.loads((root / MANIFEST_NAME).read_text())


def copy_dataset(root: Path, to: Path) -> Path:
    shutil.copytree(root, to)
    return to


# -- 1. names from a manifest never leave their directory ------------------------------------------------


BAD_NAMES = [
    "../evil.tar",
    "../../home/user/.ssh/authorized_keys",
    "/etc/evil.tar",
    "sub/../../evil.tar",
    "a\\..\\evil.tar",
    "evil\x00.tar",
    ".hidden.tar",
    "",
    "..",
]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_a_shard_name_that_is_not_a_plain_name_is_refused(tiny_dataset: Path, bad: str) -> None:
    doc = manifest_doc(tiny_dataset)
    doc["splits"]["train"]["shards"][0]["name"] = bad
    with pytest.raises(
        ManifestError, match=r"splits\.train\.shards\[0\]\.name is .*expected a relative name"
    ):
        Manifest.from_json(json.dumps(doc))


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("index", "../x.idx"),
        ("batch", "cifar-10-batches-py/../../x"),
        ("batch", "/abs/data_batch_1"),
        ("batch_dir", "../outside"),
    ],
)
def test_index_batch_and_batch_dir_names_are_checked(tiny_dataset: Path, field: str, bad: str) -> None:
    doc = manifest_doc(tiny_dataset)
    if field == "index":
        doc["splits"]["test"]["shards"][1]["index"]["name"] = bad
    elif field == "batch":
        doc["source_batches"][2]["name"] = bad
    else:
        doc["batch_dir"] = bad
    with pytest.raises(ManifestError) as caught:
        Manifest.from_json(json.dumps(doc))
    message = str(caught.value)
    assert "\n" not in message and repr(bad) in message


@pytest.mark.parametrize("bad", [-1, 0, 2**40 * 1024, 200 << 20, 1.5, True, "123", None])
def test_sizes_are_bounded_integers_before_anything_is_allocated(tiny_dataset: Path, bad: object) -> None:
    doc = manifest_doc(tiny_dataset)
    doc["splits"]["train"]["shards"][0]["bytes"] = bad
    with pytest.raises(ManifestError, match=r"splits\.train\.shards\[0\]\.bytes is .*expected an integer"):
        Manifest.from_json(json.dumps(doc))


def test_an_index_size_is_bounded_by_its_samples(tiny_dataset: Path) -> None:
    doc = manifest_doc(tiny_dataset)
    doc["splits"]["train"]["shards"][0]["index"]["bytes"] = 1 << 30  # 1 GiB for a 100-sample index
    with pytest.raises(ManifestError, match=r"index\.bytes is 1073741824; expected an integer from 1 to"):
        Manifest.from_json(json.dumps(doc))


@pytest.mark.parametrize(("field", "bad"), [("seed", float("inf")), ("seed", -3), ("shard_size", "100")])
def test_seed_and_shard_size_are_checked_too(tiny_dataset: Path, field: str, bad: object) -> None:
    doc = manifest_doc(tiny_dataset)
    doc[field] = bad
    with pytest.raises(ManifestError, match=rf"{field} is .*expected an integer"):
        Manifest.from_json(json.dumps(doc))


def test_a_checksum_must_be_sha256_hex(tiny_dataset: Path) -> None:
    doc = manifest_doc(tiny_dataset)
    doc["splits"]["train"]["shards"][0]["sha256"] = "../../x"
    with pytest.raises(ManifestError, match=r"sha256 is '\.\./\.\./x'"):
        Manifest.from_json(json.dumps(doc))


def test_local_store_paths_stay_inside_the_root(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path / "root"))
    with pytest.raises(StorageError, match=r"outside"):
        store.write_bytes("../escaped", b"x")
    assert not (tmp_path / "escaped").exists()
    with pytest.raises(StorageError, match=r"outside"):
        store.path("/etc/passwd")


def test_files_inside_refuses_a_symlink_out(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="outside"):
        files.inside(root, "link/x")
    assert files.inside(root, "ok.tar") == root / "ok.tar"


def tampered_remote(bucket: str, root: Path, server: locals3.LocalS3, bad: str) -> str:
    """The dataset at `root` on the local S3 server, its first train shard renamed to `bad` in the
    manifest and stored under that key too (so only the name check can stop a loader)."""
    url = f"s3://{bucket}/ds"
    store = open_store(url, endpoint_url=server.endpoint)
    doc = manifest_doc(root)
    first = doc["splits"]["train"]["shards"][0]
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != MANIFEST_NAME:
            store.put_file(path, path.relative_to(root).as_posix())
    store.put_file(root / first["name"], bad)
    first["name"] = bad
    store.write_bytes(MANIFEST_NAME, json.dumps(doc).encode())
    return url


@pytest.mark.parametrize("loader", ["wds", "torchvision"])
def test_a_tampered_remote_manifest_writes_nothing_outside_the_cache(
    tiny_dataset: Path, bucket: str, s3_env: locals3.LocalS3, tmp_path: Path, loader: str
) -> None:
    url = tampered_remote(bucket, tiny_dataset, s3_env, "../../pwned.tar")
    cache = tmp_path / "a" / "b" / "cache"
    cache.mkdir(parents=True)
    cfg = LoaderConfig(data=url, split="train", batch_size=64, train=True, cache_dir=str(cache))
    with pytest.raises(ManifestError, match=r"'\.\./\.\./pwned\.tar'"):
        built = make_loader(loader, cfg)
        for _ in built:
            pass
    assert not list(tmp_path.rglob("pwned*")), "no bucket-supplied file outside the cache"


# -- 2. a CIFAR batch is data, never code -----------------------------------------------------------------


@dataclass
class _Marker:
    """Unpickling this calls `open(path, "w")`: the stand-in for `os.system(...)`."""

    path: str

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


def poisoned_batch_dir(tmp_path: Path, tiny_dataset: Path, marker: Path) -> Path:
    batches = copy_dataset(tiny_dataset / BATCH_DIR, tmp_path / "src" / BATCH_DIR)
    entry = {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1], "x": _Marker(str(marker))}
    (batches / "data_batch_1").write_bytes(pickle.dumps(entry, protocol=2))
    return batches


def test_a_crafted_batch_never_runs_code(tmp_path: Path, tiny_dataset: Path) -> None:
    marker = tmp_path / "ran"
    batches = poisoned_batch_dir(tmp_path, tiny_dataset, marker)
    with pytest.raises(SourceError, match=r"refused global io\.open"):
        read_batch(batches / "data_batch_1", 10)
    assert not marker.exists()


def test_shardgen_refuses_a_crafted_source_batch(tmp_path: Path, tiny_dataset: Path) -> None:
    marker = tmp_path / "ran"
    batches = poisoned_batch_dir(tmp_path, tiny_dataset, marker)
    out = subprocess.run(
        [sys.executable, "-m", "shardgen", "--source", str(batches), "--dest", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert out.returncode == 2
    assert "refused global io.open" in out.stderr and out.stderr.count("\n") == 1
    assert not marker.exists()
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()


def test_the_baseline_loader_refuses_a_crafted_local_batch(tmp_path: Path, tiny_dataset: Path) -> None:
    marker = tmp_path / "ran"
    root = copy_dataset(tiny_dataset, tmp_path / "ds")
    entry = {"data": np.zeros((1, 3072), np.uint8), "labels": [0], "x": _Marker(str(marker))}
    target = root / BATCH_DIR / "test_batch"
    blob = pickle.dumps(entry, protocol=2)
    # the same size as the real batch (what a size-only check sees); pickle stops reading at its STOP
    target.write_bytes(blob + b"\0" * (target.stat().st_size - len(blob)))
    cfg = LoaderConfig(data=str(root), split="test", batch_size=64, train=False)
    with pytest.raises(Exception, match=r"refused global|does not match|sha256"):
        for _ in make_loader("torchvision", cfg):
            pass
    assert not marker.exists()


def test_numpy_arrays_in_either_numpy_namespace_still_load(tmp_path: Path) -> None:
    """The official batches were pickled by Python 2 with numpy 1 (`numpy.core.multiarray`)."""
    images = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    raw = pickle.dumps({b"data": images, b"labels": [3, 4]}, protocol=2)
    legacy = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    for name, blob in (("new", raw), ("legacy", legacy)):
        (tmp_path / name).write_bytes(blob)
        got, labels = read_batch(tmp_path / name, 10)
        assert labels.tolist() == [3, 4] and got.shape == (2, 32, 32, 3)


@pytest.mark.parametrize("labels", [[0.9, 1.0], [True, False], ["1", "2"], np.array([0.5, 1.5])])
def test_labels_are_not_coerced(tmp_path: Path, labels: object) -> None:
    (tmp_path / "b").write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": labels}))
    with pytest.raises(SourceError, match=r"label|labels"):
        read_batch(tmp_path / "b", 10)


# -- 5. redaction -----------------------------------------------------------------------------------------

SECRET = "wJalr/XUtn#FEMI?K7MDENG@bPx"


@pytest.mark.parametrize(
    "url",
    [
        f"http://AKIAEXAMPLE:{SECRET}@127.0.0.1:9000/bucket",
        f"https://AKIAEXAMPLE:{SECRET}@host:notaport/p",
        "https://host/b/k?X-Amz-Credential=AKIAEXAMPLE%2F2026&X-Amz-Signature=deadbeef&"
        "X-Amz-Security-Token=FQoGZXIvYXdzE&x=1",
        f"s3://AKIAEXAMPLE:{SECRET}@bucket/prefix",
    ],
)
def test_redaction_hides_every_secret_and_never_raises(url: str) -> None:
    shown = redact_url(url)
    for secret in (SECRET, "AKIAEXAMPLE", "deadbeef", "FQoGZXIvYXdzE", "wJalr", "K7MDENG"):
        assert secret not in shown, shown
    assert "***" in shown


def test_redaction_of_anything_at_all_does_not_raise() -> None:
    for value in (None, 12, b"http://a:b@c", object(), "http://[::1:bad", "\udcff://x@y"):
        assert isinstance(redact_url(value), str)


def test_urls_in_storage_errors_are_redacted() -> None:
    with pytest.raises(StorageError) as caught:
        open_store(f"gs://AKIAEXAMPLE:{SECRET}@bucket/x")
    assert SECRET not in str(caught.value) and "AKIAEXAMPLE" not in str(caught.value)
    with pytest.raises(StorageError) as caught:
        open_store(f"s3://AKIAEXAMPLE:{SECRET}@bucket/x?y")
    assert "wJalr" not in str(caught.value) and "AKIAEXAMPLE" not in str(caught.value)


# -- 13. URL parts are never dropped silently ----------------------------------------------------------


@pytest.mark.parametrize("url", ["s3://b/ds#v2", "s3://b/ds?versionId=3", "cos://b/ds?x"])
def test_a_query_or_fragment_on_an_object_url_is_an_error(url: str) -> None:
    with pytest.raises(StorageError, match=r"query or fragment"):
        open_store(url)


def test_file_url_with_a_host_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=r"names host 'server'"):
        open_store("file://server/share/ds")
    assert open_store(f"file://{tmp_path}").root == tmp_path  # type: ignore[attr-defined]
    assert open_store(f"file://localhost{tmp_path}").root == tmp_path  # type: ignore[attr-defined]


# -- 4. ranged reads check Content-Range and the pinned ETag ---------------------------------------------


@dataclass
class IgnoreRange(Fault):
    """A server or gateway that ignores `Range` (HTTP allows it): the request goes on without it, and the
    whole object comes back with 200."""

    def serve(self, exchange: Exchange) -> bool:
        raw = exchange.request.raw.decode("latin-1").split("\r\n")
        kept = [line for line in raw if not line.lower().startswith("range:")]
        exchange.request.raw = "\r\n".join(kept).encode("latin-1")
        return exchange.forward()


def stored_object(bucket: str, server: locals3.LocalS3, data: bytes) -> None:
    open_store(f"s3://{bucket}/obj", endpoint_url=server.endpoint).write_bytes("blob", data)


def test_a_ranged_read_answered_with_the_whole_object_is_an_error(
    bucket: str, s3_env: locals3.LocalS3
) -> None:
    data = bytes(range(256)) * 64
    stored_object(bucket, s3_env, data)
    with NetProxy(s3_env.endpoint) as proxy:
        proxy.add(IgnoreRange(times=None))
        store = open_store(f"s3://{bucket}/obj", endpoint_url=proxy.endpoint)
        with (
            pytest.raises(StorageError, match=r"blob: asked for bytes 100-199.*ignores Range"),
            store.open_read("blob", 100, 200) as stream,
        ):
            stream.read()


def test_a_resume_that_gets_the_whole_object_is_not_spliced_in(bucket: str, s3_env: locals3.LocalS3) -> None:
    data = os.urandom(3 << 20)
    stored_object(bucket, s3_env, data)
    with NetProxy(s3_env.endpoint) as proxy:
        proxy.add(Reset(after_bytes=1 << 20))  # the first GET breaks mid-body ...
        proxy.add(IgnoreRange(times=None))  # ... and the resume's Range is ignored
        store = open_store(f"s3://{bucket}/obj", endpoint_url=proxy.endpoint)
        with pytest.raises(StorageError, match=r"Content-Range"):
            store.read_bytes("blob")


# -- 8. the umask is read, never changed ----------------------------------------------------------------


def test_concurrent_writes_never_change_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        store = LocalStore(str(tmp_path))
        threads = [
            threading.Thread(target=lambda i=i: [store.write_bytes(f"f{i}-{j}", b"x") for j in range(20)])
            for i in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert os.umask(0o027) == 0o027
        assert {p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {0o640}
    finally:
        os.umask(old)


# -- 14. a failed download leaks no file descriptor -------------------------------------------------------


def test_a_failed_download_leaks_no_file_descriptor(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(OSError):
            source.download_cifar10(tmp_path, url=f"http://127.0.0.1:{port}/cifar.tar.gz")
    assert len(os.listdir("/proc/self/fd")) == before
    assert not list(tmp_path.iterdir()), "no partial download left behind"
