"""The storage scheme table: local files and a real S3 server over HTTP through boto3 and ibm_boto3."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from feedrate.storage import COSStore, LocalStore, S3Store, StorageError, open_store, redact_url


def test_scheme_table() -> None:
    assert isinstance(open_store("data/x"), LocalStore)
    assert isinstance(open_store("file:///tmp/x"), LocalStore)
    assert isinstance(open_store("s3://b/p"), S3Store)
    assert isinstance(open_store("cos://b/p"), COSStore)


def test_unknown_scheme_is_a_value_error_naming_url_and_schemes() -> None:
    with pytest.raises(ValueError, match=r"unknown storage scheme 'gs' in 'gs://b/x'.*s3://.*cos://"):
        open_store("gs://b/x")


def test_missing_bucket_name() -> None:
    with pytest.raises(StorageError, match=r"no bucket in 's3:///x'"):
        open_store("s3:///x")


def test_redact_url_drops_userinfo() -> None:
    assert redact_url("http://key:secret@host:9000/p") == "http://***@host:9000/p"
    assert redact_url("http://host/p") == "http://host/p"


def test_local_writes_are_atomic_and_readable(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "root"))
    store.write_bytes("a/b.bin", b"12345")
    assert store.exists("a/b.bin") and store.size("a/b.bin") == 5
    with store.open_read("a/b.bin", start=2) as f:
        assert f.read() == b"345"
    assert store.list() == ["a/b.bin"]
    mode = stat.S_IMODE((tmp_path / "root" / "a" / "b.bin").stat().st_mode)
    assert mode & 0o044, "published files are readable by others (not mkstemp's 0600)"
    store.delete("a/b.bin")
    assert not store.exists("a/b.bin")
    assert store.counters.bytes_read == 3 and store.counters.bytes_written == 5


@pytest.mark.parametrize("scheme", ["s3", "cos"])
def test_object_store_round_trip(scheme: str, bucket: str, tmp_path: Path, s3_server) -> None:
    store = open_store(f"{scheme}://{bucket}/pre/fix")
    assert not store.exists("x.bin")
    payload = bytes(range(256)) * 1000
    local = tmp_path / "up.bin"
    local.write_bytes(payload)
    store.put_file(local, "x.bin")
    assert store.exists("x.bin") and store.size("x.bin") == len(payload)
    assert store.read_bytes("x.bin") == payload
    with store.open_read("x.bin", start=1000) as f:
        assert f.read() == payload[1000:]
    store.get_file("x.bin", tmp_path / "down" / "x.bin")
    assert (tmp_path / "down" / "x.bin").read_bytes() == payload
    assert store.list() == ["x.bin"]
    gets = s3_server.requests("GET", f"/{bucket}/pre/fix/x.bin")
    assert len(gets) >= 3, "whole, ranged (206) and managed GETs are all counted at the server"
    store.delete("x.bin")
    assert store.list() == []
    with pytest.raises(StorageError, match=rf"{scheme}://{bucket}/pre/fix/gone.bin does not exist"):
        store.read_bytes("gone.bin")
