"""Reads that survive a flaky network: faults injected by the proxy (rig/netproxy.py) between the SDK and
the real moto server process."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from feedrate.storage import RetryPolicy, StorageError, open_store
from loaders.streaming import WdsLoader
from rig.netproxy import Answer, CutBody, Exchange, NetProxy
from tests.helpers import all_keys, build_coded, config, epoch

FAST = RetryPolicy(resumes=3, base_delay_s=0.01, max_delay_s=0.05)
PAYLOAD = os.urandom(700_000)
CUT = 150_000  # bytes relayed before a cut; a closed (not reset) connection delivers all of them


def first_byte(range_header: str | None) -> int:
    return int(range_header.split("=")[1].split("-")[0]) if range_header else 0


@pytest.mark.parametrize("scheme", ["s3", "cos"])
def test_cut_body_resumes_from_the_byte_reached(scheme: str, bucket: str, proxy: NetProxy) -> None:
    open_store(f"{scheme}://{bucket}").write_bytes("x.bin", PAYLOAD)
    proxy.add(CutBody(path_contains="x.bin", after_bytes=CUT, times=2))
    store = open_store(f"{scheme}://{bucket}", endpoint_url=proxy.endpoint, retry=FAST)
    with store.open_read("x.bin") as stream:
        assert stream.read() == PAYLOAD
    gets = proxy.requests("GET", "x.bin")
    assert [g.fault for g in gets] == ["CutBody", "CutBody", None]
    assert [first_byte(g.range) for g in gets] == [0, CUT, 2 * CUT], "each resume starts at the byte reached"
    assert store.counters.retries == 2 and store.counters.bytes_read == len(PAYLOAD)


def test_ranged_read_resumes_within_its_range(bucket: str, proxy: NetProxy) -> None:
    open_store(f"s3://{bucket}").write_bytes("x.bin", PAYLOAD)
    proxy.add(CutBody(path_contains="x.bin", after_bytes=CUT))
    store = open_store(f"s3://{bucket}", endpoint_url=proxy.endpoint, retry=FAST)
    start, end = 1000, 1000 + 2 * CUT + 7
    with store.open_read("x.bin", start, end) as stream:
        assert stream.read() == PAYLOAD[start:end]
    assert [g.range for g in proxy.requests("GET", "x.bin")] == [
        f"bytes={start}-{end - 1}",
        f"bytes={start + CUT}-{end - 1}",
    ]


def test_503_is_retried_and_counted(bucket: str, proxy: NetProxy) -> None:
    open_store(f"s3://{bucket}").write_bytes("x.bin", PAYLOAD)
    proxy.add(Answer(path_contains="x.bin", status=503))
    store = open_store(f"s3://{bucket}", endpoint_url=proxy.endpoint, retry=FAST)
    assert store.read_bytes("x.bin") == PAYLOAD
    assert [g.fault for g in proxy.requests("GET", "x.bin")] == ["Answer", None]
    assert store.counters.retries == 1


def test_past_the_budget_an_error_names_the_url_and_the_cause(bucket: str, proxy: NetProxy) -> None:
    open_store(f"s3://{bucket}").write_bytes("x.bin", PAYLOAD)
    proxy.add(CutBody(path_contains="x.bin", after_bytes=1000, times=None))
    store = open_store(f"s3://{bucket}", endpoint_url=proxy.endpoint, retry=FAST)
    with pytest.raises(StorageError) as info:
        store.read_bytes("x.bin")
    message = str(info.value)
    assert message.startswith(f"s3://{bucket}/x.bin: ")
    assert "connection lost at byte" in message and "gave up after 3 resumed GET(s)" in message
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in message
    assert len(proxy.requests("GET", "x.bin")) == 4 and store.counters.retries == 3


@dataclass
class ReplaceThenCut(CutBody):
    """Cut the body after `replace()` put a new version upstream: a resume would mix two versions."""

    replace: Callable[[], None] = lambda: None

    def serve(self, exchange: Exchange) -> bool:
        keep = super().serve(exchange)
        self.replace()
        return keep


def test_a_resume_never_mixes_object_versions(bucket: str, proxy: NetProxy) -> None:
    direct = open_store(f"s3://{bucket}")
    direct.write_bytes("x.bin", PAYLOAD)
    replace = lambda: direct.write_bytes("x.bin", b"new" * 1000)  # noqa: E731
    proxy.add(ReplaceThenCut(path_contains="x.bin", after_bytes=CUT, replace=replace))
    store = open_store(f"s3://{bucket}", endpoint_url=proxy.endpoint, retry=FAST)
    with pytest.raises(StorageError, match=rf"s3://{bucket}/x.bin: .*(PreconditionFailed|412)"):
        store.read_bytes("x.bin")


def test_an_epoch_through_cuts_and_503s_yields_every_sample_once(
    bucket: str, proxy: NetProxy, tmp_path: Path
) -> None:
    url = f"s3://{bucket}/ds"
    build_coded(tmp_path / "ds", "raw", shard_size=100, train=300, test=5, url=url)  # shards of ~460 KB
    proxy.add(CutBody(path_contains="/ds/train-000001.tar", after_bytes=CUT))
    proxy.add(Answer(path_contains="/ds/train-000002.tar", status=503))
    # No reading ahead into epoch 1: its GETs could take the faults, and their retries show in no
    # counter of epoch 0.
    options = {"keys": True, "read_ahead": False}
    with WdsLoader(
        config(url, workers=2, endpoint_url=proxy.endpoint, batch_size=64, options=options)
    ) as loader:
        keys, _, _ = epoch(loader)
        stats = loader.stats()
    assert Counter(keys) == Counter(all_keys(300))
    assert stats["retries"] == 2
    resumed = proxy.requests("GET", "/ds/train-000001.tar")
    assert [first_byte(g.range) for g in resumed] == [0, CUT]
    assert [g.fault for g in proxy.requests("GET", "/ds/train-000002.tar")] == ["Answer", None]
