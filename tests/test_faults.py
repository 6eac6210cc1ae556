"""Fault injection across the data path: a loopback proxy (rig/netproxy.py) between the SDKs and the
real moto server process resets connections mid-body, answers 503 SlowDown, stalls past the client's read
timeout and truncates bodies, for each part of the path that talks to an object store:

- shardgen's upload (managed transfers: single PUTs, and a multipart upload for the truncated answer);
- the torchvision baseline's download of the CIFAR batches (and the tensor loader's, the same files);
- the wds loader's whole-shard GETs (in DataLoader worker processes);
- the DALI loader's remote path (whole shards fetched into a cache before DALI reads them).

A fault hit once must be survived: every sample exactly once, the retry counted in the run's counters.
A fault that never stops must end the run within its bounded budget with a StorageError that names the
object's URL, leaving nothing half-written behind. Every run is tallied into the table that
`make test-faults` prints at the end of the session (conftest.py): faults injected, survived, failed
cleanly, samples lost (which must be 0).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from encoded import decode_identity

import loaders
from feedrate.errors import FeedrateError
from feedrate.manifest import MANIFEST_NAME
from feedrate.storage import READ_TIMEOUT_ENV, StorageError, open_store
from loaders import LoaderConfig, make_loader
from loaders.streaming import WdsLoader
from rig import locals3
from rig.netproxy import Answer, CutRequest, Fault, NetProxy, Reset, Stall, Truncate
from shardgen import ShardgenConfig, build
from tests.helpers import FaultTally, Outcome, needs_dali

N_TRAIN, N_TEST, SHARD = 300, 100, 100  # encoded png: 3 train shards of ~200 KB, batches of ~180 KB
CUT = 64 * 1024  # bytes relayed before a body is cut or stalls
STALL_TIMEOUT_S = "1"  # the client's read timeout in stall tests: a stall costs a second, not a minute
BUDGET_S = 60  # generous: proves "bounded", never a timing claim
FAULTS = ("reset", "503", "stall", "truncated")


@pytest.fixture(scope="module")
def encoded_root(make_encoded_dataset) -> Path:
    """The local encoded dataset; its CIFAR batches are at `../src` (shardgen's source for uploads)."""
    return make_encoded_dataset(fmt="png", n_train=N_TRAIN, n_test=N_TEST, shard_size=SHARD)


@pytest.fixture(scope="module")
def remote(s3_server: locals3.LocalS3, encoded_root: Path) -> str:
    """The encoded dataset published once to a bucket of its own, written straight to the server.

    Read-only for the tests (each injects its faults between its own reader and the server)."""
    bucket = "faults-remote"
    locals3.create_bucket(s3_server.endpoint, bucket)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_server.env().items():
            mp.setenv(key, value)
        store = open_store(f"s3://{bucket}/ds")
        for path in sorted(encoded_root.rglob("*")):
            if path.is_file():
                store.put_file(path, path.relative_to(encoded_root).as_posix())
    return f"s3://{bucket}/ds"


def download_fault(kind: str, target: str, times: int | None = 1) -> Fault:
    """A fault on the GETs of objects whose path contains `target`.

    One that never stops (`times=None`) cuts after a few bytes, so no number of resumes gets through,
    and stalls before any answer, so it is the SDK's own retries that run out."""
    cut = CUT if times == 1 else 1000
    made: dict[str, Fault] = {
        "reset": Reset(path_contains=target, after_bytes=cut, times=times),
        "503": Answer(path_contains=target, times=times),
        "stall": Stall(path_contains=target, after_bytes=cut if times == 1 else None, times=times),
        "truncated": Truncate(path_contains=target, after_bytes=cut, times=times),
    }
    return made[kind]


def lost_samples(seen: list[int], expected: set[int]) -> int:
    """Samples missing, repeated or not in the split: 0 when every sample came exactly once."""
    counts = Counter(seen)
    missing = len(expected - counts.keys())
    repeated = sum(n - 1 for n in counts.values() if n > 1)
    foreign = sum(n for s, n in counts.items() if s not in expected)
    return missing + repeated + foreign


@dataclass
class Run:
    """What one run under faults delivered: sample ids, how many came with another sample's label, and
    the retries its counters recorded."""

    seen: list[int]
    retries: int
    mislabelled: int = 0


def survive(
    tally: FaultTally, path: str, fault: Fault, proxy: NetProxy, expected: set[int], run: Callable[[], Run]
) -> Run:
    """Run `run` with `fault` injected once; it must deliver every sample exactly once and count a retry."""
    proxy.add(fault)
    try:
        result = run()
    except FeedrateError:
        tally.add(Outcome(path, fault.label, proxy.injected, "failed cleanly", 0, 0))
        raise
    except BaseException:
        tally.add(Outcome(path, fault.label, proxy.injected, "unclean", 0, 0))
        raise
    lost = lost_samples(result.seen, expected) + result.mislabelled
    tally.add(Outcome(path, fault.label, proxy.injected, "survived", lost, result.retries))
    assert proxy.injected == 1, "the fault was injected"
    assert lost == 0, f"{lost} samples lost, repeated, foreign or mislabelled"
    assert result.retries >= 1, "the retry is counted"
    return result


def fail_cleanly(
    tally: FaultTally, path: str, fault: Fault, proxy: NetProxy, url: str, run: Callable[[], object]
) -> str:
    """Run `run` with `fault` injected on every attempt: it must fail in bounded time with a
    StorageError naming `url` (and no secret). Returns the message."""
    proxy.add(fault)
    started = time.monotonic()
    try:
        run()
    except StorageError as exc:
        message = str(exc)
        clean = url in message and os.environ["AWS_SECRET_ACCESS_KEY"] not in message
        tally.add(Outcome(path, fault.label, proxy.injected, "failed cleanly" if clean else "unclean", 0, 0))
        assert clean, message
        assert time.monotonic() - started < BUDGET_S
        assert proxy.injected > 1, "the fault was retried before the run gave up"
        return message
    except BaseException:
        tally.add(Outcome(path, fault.label, proxy.injected, "unclean", 0, 0))
        raise
    tally.add(Outcome(path, fault.label, proxy.injected, "unclean", 0, 0))
    raise AssertionError(f"the run survived a fault that never stops ({fault.label})")


# -- loaders -----------------------------------------------------------------------------------------------
def loader_cfg(remote: str, proxy: NetProxy, cache: Path | None, **kw: object) -> LoaderConfig:
    settings: dict = {"split": "train", "batch_size": 64, "train": True, "workers": 0} | kw
    cache_dir = None if cache is None else str(cache)
    return LoaderConfig(data=remote, endpoint_url=proxy.endpoint, cache_dir=cache_dir, **settings)


def label_of(sample: int) -> int:
    return (sample * 7 + 3) % 10  # tests/encoded.py


def image_epoch(name: str, cfg: LoaderConfig) -> Run:
    """One epoch of loader `name`; the sample ids (and labels) read back from the images' pixels."""
    loader = make_loader(name, cfg)
    seen: list[int] = []
    mislabelled = 0
    for images, labels in loader:
        ids, coded = decode_identity(images)
        seen += ids
        mislabelled += sum(
            a != b or a != label_of(i) for a, b, i in zip(labels.tolist(), coded, ids, strict=True)
        )
    return Run(seen, loader.stats()["retries"], mislabelled)


def wds_epoch(cfg: LoaderConfig) -> Run:
    with WdsLoader(cfg) as loader:
        seen: list[int] = []
        mislabelled = 0
        for _, labels, keys in loader.iter_keyed():
            ids = [int(k.rsplit("_", 1)[1]) for k in keys]
            seen += ids
            mislabelled += sum(y != label_of(i) for y, i in zip(labels.tolist(), ids, strict=True))
        return Run(seen, loader.stats()["retries"], mislabelled)


TRAIN_IDS = set(range(N_TRAIN))
PATHS = {
    "torchvision": "torchvision download (s3)",
    "tensor": "tensor download (s3)",
    "wds": "wds loader (s3)",
    "dali": "dali remote path (s3)",
}


@pytest.mark.parametrize("kind", FAULTS)
@pytest.mark.parametrize("name", ["torchvision", "tensor"])
def test_batch_download_survives(
    name: str, kind: str, remote: str, proxy: NetProxy, tally: FaultTally, tmp_path: Path, monkeypatch
) -> None:
    if kind == "stall":
        monkeypatch.setenv(READ_TIMEOUT_ENV, STALL_TIMEOUT_S)
    fault = download_fault(kind, "/cifar-10-batches-py/data_batch_2")
    cfg = loader_cfg(remote, proxy, tmp_path / "cache")
    survive(tally, PATHS[name], fault, proxy, TRAIN_IDS, lambda: image_epoch(name, cfg))


@pytest.mark.parametrize("kind", FAULTS)
def test_wds_loader_survives(
    kind: str, remote: str, proxy: NetProxy, tally: FaultTally, tmp_path: Path, monkeypatch
) -> None:
    if kind == "stall":
        monkeypatch.setenv(READ_TIMEOUT_ENV, STALL_TIMEOUT_S)
    fault = download_fault(kind, "/ds/train-000001.tar")
    # Without reading ahead: a reader done with its own shards would otherwise start on the next
    # epoch's, and the fault could hit that GET, whose retry no counter of this epoch shows yet.
    cfg = loader_cfg(remote, proxy, None, workers=2, options={"keys": True, "read_ahead": False})
    survive(tally, PATHS["wds"], fault, proxy, TRAIN_IDS, lambda: wds_epoch(cfg))


def test_wds_loader_survives_on_cos(remote: str, proxy: NetProxy, tally: FaultTally, tmp_path: Path) -> None:
    fault = download_fault("reset", "/ds/train-000002.tar")
    cos = remote.replace("s3://", "cos://")
    cfg = loader_cfg(cos, proxy, None, options={"keys": True})
    survive(tally, "wds loader (cos)", fault, proxy, TRAIN_IDS, lambda: wds_epoch(cfg))


@needs_dali
@pytest.mark.parametrize("kind", FAULTS)
def test_dali_remote_path_survives(
    kind: str, remote: str, proxy: NetProxy, tally: FaultTally, tmp_path: Path, monkeypatch
) -> None:
    if kind == "stall":
        monkeypatch.setenv(READ_TIMEOUT_ENV, STALL_TIMEOUT_S)
    fault = download_fault(kind, "/ds/train-000001.tar")
    cfg = loader_cfg(remote, proxy, tmp_path / "cache", workers=1, device="cpu")
    survive(tally, PATHS["dali"], fault, proxy, TRAIN_IDS, lambda: image_epoch("dali", cfg))


# -- loaders: faults that never stop ------------------------------------------------------------------------
# What each message says about the budget it spent (feedrate.storage: 5 resumes, 4 attempts per request).
BUDGET_SPENT = {
    "reset": "gave up after 5 resumed GET(s)",
    "truncated": "gave up after 5 resumed GET(s)",
    "503": "(HTTP 503, 4 attempts)",
    "stall": "timed out reading",
}


def partial_files(cache: Path) -> list[str]:
    """Temporary files a failed fetch left in the cache (only verified copies may ever be there)."""
    return sorted(p.name for p in cache.rglob("*") if p.is_file() and p.name.startswith("."))


@pytest.mark.parametrize(
    ("name", "kind"), [("torchvision", "reset"), ("tensor", "503"), ("wds", "truncated"), ("dali", "stall")]
)
def test_a_fault_that_never_stops_fails_cleanly(
    name: str, kind: str, remote: str, proxy: NetProxy, tally: FaultTally, tmp_path: Path, monkeypatch
) -> None:
    if name == "dali" and (why := loaders.unavailable("dali")) is not None:
        pytest.skip(why)
    if kind == "stall":
        monkeypatch.setenv(READ_TIMEOUT_ENV, STALL_TIMEOUT_S)
    obj = "train-000001.tar" if name in ("wds", "dali") else "cifar-10-batches-py/data_batch_2"
    fault = download_fault(kind, f"/ds/{obj}", times=None)
    cache = tmp_path / "cache"
    cfg = loader_cfg(remote, proxy, cache, options={"keys": True} if name == "wds" else {})
    run = (lambda: wds_epoch(cfg)) if name == "wds" else (lambda: image_epoch(name, cfg))
    message = fail_cleanly(tally, PATHS[name], fault, proxy, f"{remote}/{obj}", run)
    assert BUDGET_SPENT[kind] in message, message
    assert partial_files(cache) == [], message


# -- shardgen's upload -------------------------------------------------------------------------------------
def upload_fault(kind: str, target: str, times: int | None = 1) -> Fault:
    """A fault on the uploads (PUT: whole objects and parts) of objects whose path contains `target`."""
    made: dict[str, Fault] = {
        "reset": CutRequest(path_contains=target, after_bytes=CUT, times=times),
        "503": Answer(method="PUT", path_contains=target, times=times),
        "stall": Stall(method="PUT", path_contains=target, times=times),
        # The only upload answers with a body: "start a multipart upload" (its upload id).
        "truncated": Truncate(method="POST", path_contains=f"{target}?uploads", after_bytes=40, times=times),
    }
    return made[kind]


def open_uploads(endpoint: str, bucket: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=endpoint)
    return [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def read_back(url: str) -> list[int]:
    """The train split of a published dataset, read straight from the server with every shard's sha256
    checked against the manifest: the sample ids."""
    cfg = LoaderConfig(
        data=url, split="train", batch_size=512, train=False, options={"keys": True, "verify": True}
    )
    with WdsLoader(cfg) as loader:
        return [int(k.rsplit("_", 1)[1]) for _, _, keys in loader.iter_keyed() for k in keys]


@pytest.mark.parametrize("scheme", ["s3", "cos"])
@pytest.mark.parametrize("kind", FAULTS)
def test_shardgen_upload_survives(
    kind: str,
    scheme: str,
    bucket: str,
    proxy: NetProxy,
    tally: FaultTally,
    make_encoded_dataset,
    monkeypatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if kind == "stall":
        monkeypatch.setenv(READ_TIMEOUT_ENV, STALL_TIMEOUT_S)
    n_train, shard = N_TRAIN, SHARD
    if kind == "truncated":
        # One raw shard of 1,200 samples (5.5 MB) above a 5 MiB threshold: a multipart upload.
        monkeypatch.setattr("feedrate.storage.MULTIPART_THRESHOLD", 5 * 1024 * 1024)
        monkeypatch.setattr("feedrate.storage.MULTIPART_CHUNKSIZE", 5 * 1024 * 1024)
        n_train = shard = 1200
    fmt = "raw" if kind == "truncated" else "png"
    source = make_encoded_dataset(fmt=fmt, n_train=n_train, n_test=10, shard_size=shard).parent / "src"
    url = f"{scheme}://{bucket}/ds"
    target = "/ds/train-000000.tar" if kind == "truncated" else "/ds/train-000001.tar"
    fault = upload_fault(kind, target)

    def run() -> Run:
        build(
            ShardgenConfig(
                dest=url, source=str(source), fmt=fmt, shard_size=shard, endpoint_url=proxy.endpoint
            )
        )
        note = [line for line in capsys.readouterr().err.splitlines() if "were retried" in line]
        retries = int(note[0].split("shardgen: ")[1].split()[0]) if note else 0
        return Run(read_back(url), retries)

    survive(tally, f"shardgen upload ({scheme})", fault, proxy, set(range(n_train)), run)
    assert open_uploads(proxy.endpoint, bucket) == [], "no multipart upload left open"


@pytest.mark.parametrize("scheme", ["s3", "cos"])
def test_shardgen_upload_that_never_succeeds_fails_cleanly(
    scheme: str, bucket: str, proxy: NetProxy, tally: FaultTally, encoded_root: Path
) -> None:
    url = f"{scheme}://{bucket}/ds"
    fault = upload_fault("503", "/ds/train-000001.tar", times=None)
    cfg = ShardgenConfig(
        dest=url,
        source=str(encoded_root.parent / "src"),
        fmt="png",
        shard_size=SHARD,
        endpoint_url=proxy.endpoint,
    )
    message = fail_cleanly(
        tally, f"shardgen upload ({scheme})", fault, proxy, f"{url}/train-000001.tar", lambda: build(cfg)
    )
    assert message.endswith(BUDGET_SPENT["503"]), message
    store = open_store(url)
    assert not store.exists(MANIFEST_NAME), "an incomplete dataset never gets a manifest"
    assert open_uploads(proxy.endpoint, bucket) == []


def test_the_tally_counts_what_it_is_given() -> None:
    """The table itself: rows per (path, fault), totals, and lost samples summed."""
    t = FaultTally()
    t.add(Outcome("wds", "reset mid-body", 1, "survived", 0, 1))
    t.add(Outcome("wds", "reset mid-body", 4, "failed cleanly", 0, 0))
    t.add(Outcome("dali", "503 SlowDown", 1, "survived", 2, 1))
    lines = t.table().splitlines()
    assert lines[0].split()[:2] == ["path", "fault"]
    assert lines[-1].split() == ["total", "6", "2", "1", "0", "2", "2"]
    with pytest.raises(ValueError, match="unknown result"):
        t.add(Outcome("x", "y", 0, "fine", 0, 0))
