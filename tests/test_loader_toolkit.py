"""The toolkit every loader backend shares (loaders.availability, options, stats, seeds, devices, local
copies), exercised through the real backends: real shards from shardgen, the real local S3 server, GETs
counted at that server."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

import loaders
from feedrate.cifar import CLASS_NAMES, write_batch_dir
from feedrate.errors import FeedrateError
from feedrate.shardformat import ShardError
from loaders import LoaderConfig, make_loader
from loaders.seeds import AUGMENT, ORDER, epoch_seed
from loaders.shards import ShardCache, dataset_key, open_dataset
from shardgen import ShardgenConfig, build
from tests.helpers import needs_dali

REPO = Path(__file__).resolve().parents[1]
TRAIN, TEST = 24, 6


def make_source(base: Path) -> Path:
    """CIFAR python batches of random images (labels 0-9): the source several builds share."""
    rng = np.random.default_rng(3)
    splits = {}
    for name, n in (("train", TRAIN), ("test", TEST)):
        splits[name] = (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n))
    source = base / "cifar-10-batches-py"
    write_batch_dir(source, splits, CLASS_NAMES, "toolkit")
    return source


def publish(source: Path, url: str, fmt: str) -> str:
    build(ShardgenConfig(dest=url, source=str(source), fmt=fmt, shard_size=10, allow_download=False))
    return url


def config(data: str | Path, **kw: object) -> LoaderConfig:
    settings: dict = {"split": "train", "batch_size": 8, "train": False} | kw
    return LoaderConfig(data=str(data), **settings)


def shard_gets(server, bucket: str) -> int:
    """GETs of shard and index files, counted at the server."""
    return sum(1 for r in server.requests("GET", f"/{bucket}/") if r.split("?")[0].endswith((".tar", ".idx")))


def read_epoch(loader: loaders.Loader) -> int:
    try:
        return sum(len(labels) for _, labels in loader)
    finally:
        loader.close()


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_source(tmp_path_factory.mktemp("toolkit-src"))


@pytest.fixture(scope="module")
def local_raw(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(publish(source, str(tmp_path_factory.mktemp("toolkit") / "raw"), "raw"))


# -- loaders.unavailable: can this backend run here? -------------------------------------------------------
def test_the_probe_says_why_dali_mixed_decode_cannot_run_without_a_gpu() -> None:
    import torch

    reason = loaders.unavailable("dali", "cuda")
    if torch.cuda.is_available():
        assert reason is None or "needs the package" in reason
    else:
        assert reason is not None and reason.startswith("DALI mixed (nvJPEG) decode needs a CUDA GPU; ")
    assert loaders.unavailable("dali", "cpu") == (
        None if importlib.util.find_spec("nvidia.dali") else loaders.unavailable("dali", "cuda")
    )


def test_the_gpu_reason_names_the_role_of_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    import loaders.availability as availability

    monkeypatch.setattr(availability, "_no_gpu", lambda: "no NVIDIA driver on this machine")
    reason = loaders.unavailable("dali", "cuda")
    assert reason is not None and reason.startswith("DALI mixed (nvJPEG) decode needs a CUDA GPU")
    assert "no NVIDIA driver" in reason
    assert loaders.unavailable("tensor", "cuda:1") == (
        "loader 'tensor' on cuda:1 needs a CUDA GPU; no NVIDIA driver on this machine"
    )


def test_the_probe_names_a_missing_package_before_asking_for_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import loaders.availability as availability

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda m, *a: None if m == "nvidia.dali" else real(m, *a)
    )
    monkeypatch.setattr(availability, "_no_gpu", lambda: pytest.fail("a missing package needs no GPU check"))
    assert loaders.unavailable("dali", "cuda") == (
        "loader 'dali' needs the package that provides 'nvidia.dali': pip install nvidia-dali-cuda120"
    )
    assert loaders.unavailable("torchvision") is None


def test_the_probe_imports_nothing_heavy_for_the_cpu() -> None:
    code = (
        "import sys, loaders\n"
        "print([loaders.unavailable(n) for n in loaders.BACKENDS])\n"
        "print(sorted(m for m in ('torch', 'nvidia.dali', 'torchvision') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "[]"


def test_the_probe_rejects_an_unknown_loader_or_device() -> None:
    accepted = "accepted: torchvision, wds, dali, tensor"
    with pytest.raises(FeedrateError, match=rf"unknown loader 'ffcv'; {accepted}"):
        loaders.unavailable("ffcv")
    with pytest.raises(FeedrateError, match=r"unknown device 'tpu'; accepted: cpu, cuda, cuda:N"):
        loaders.unavailable("wds", "tpu")


# -- one cache layout, keyed by dataset ---------------------------------------------------------------------
def test_two_datasets_sharing_a_cache_dir_keep_both_copies_valid(
    source: Path, bucket: str, s3_env, tmp_path: Path
) -> None:
    """A raw and a png build of one source have shards of the same names: each keeps its own copy, so
    alternating between them refetches nothing (with one flat directory each evicted the other)."""
    urls = [publish(source, f"s3://{bucket}/{fmt}", fmt) for fmt in ("raw", "png")]
    cache = tmp_path / "cache"
    rounds = []
    for _ in range(2):
        before = shard_gets(s3_env, bucket)
        for url in urls:
            assert read_epoch(make_loader("wds", config(url, cache_dir=str(cache)))) == TRAIN
        rounds.append(shard_gets(s3_env, bucket) - before)
    assert rounds[0] == 2 * (3 + 3)  # both datasets: 3 shards and 3 index files each
    assert rounds[1] == 0, "the second round reads both datasets from the cache"
    keys = {dataset_key(open_dataset(url)) for url in urls}
    assert sorted(p.name for p in cache.iterdir()) == sorted(keys) and len(keys) == 2


@needs_dali
def test_a_wds_and_a_dali_run_of_one_dataset_share_one_copy(
    source: Path, bucket: str, s3_env, tmp_path: Path
) -> None:
    url = publish(source, f"s3://{bucket}/shared", "png")
    cache = tmp_path / "cache"
    before = shard_gets(s3_env, bucket)
    assert read_epoch(make_loader("wds", config(url, cache_dir=str(cache)))) == TRAIN
    after_wds = shard_gets(s3_env, bucket)
    assert after_wds - before == 6
    dali = make_loader("dali", config(url, cache_dir=str(cache)))
    assert dali.stats()["cache_hits"] == 6 and dali.stats()["cache_misses"] == 0
    assert read_epoch(dali) == TRAIN
    assert shard_gets(s3_env, bucket) == after_wds, "DALI read the copy wds made"
    assert len(list(cache.iterdir())) == 1


def test_a_name_that_would_leave_the_cache_is_refused(local_raw: Path, tmp_path: Path) -> None:
    cache = ShardCache(open_dataset(str(local_raw)), tmp_path / "cache")
    assert cache.path("train-000000.tar").parent == cache.dir
    for name in ("../outside.tar", "/etc/passwd"):
        with pytest.raises(ShardError, match="outside"):
            cache.path(name)


def ours(scratch: Path) -> list[str]:
    """The loaders' own entries in a temporary directory (torch may put its compile cache,
    torchinductor_<user>, there on first import of some modules: not ours to clean)."""
    return sorted(p.name for p in scratch.iterdir() if p.name.startswith("feedrate-"))


@needs_dali
def test_a_temporary_copy_goes_on_close_and_when_construction_is_interrupted(
    source: Path, bucket: str, s3_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = publish(source, f"s3://{bucket}/tmpcopy", "raw")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    loader = make_loader("dali", config(url))
    assert sorted(p.startswith("feedrate-dali-idx-") for p in ours(scratch)) == [False, True]  # copy, indexes
    assert read_epoch(loader) == TRAIN  # read_epoch closes it
    assert ours(scratch) == []

    real = ShardCache.fetch
    calls = []

    def interrupted(self: ShardCache, name: str, size: int, sha256: str) -> Path:
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what train.py makes of SIGTERM
        return real(self, name, size, sha256)

    monkeypatch.setattr(ShardCache, "fetch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make_loader("dali", config(url))
    assert len(calls) >= 2 and ours(scratch) == []
    with pytest.raises(KeyboardInterrupt):  # the batch readers too
        calls.clear()
        make_loader("torchvision", config(url))
    assert ours(scratch) == []


# -- one options parser -----------------------------------------------------------------------------------
ACCEPTED = {
    "torchvision": "net, skip_bad, verify",
    "tensor": "net, skip_bad, verify",
    "wds": "augment_at, decode, keys, net, prefetch, read_ahead, rehash, shuffle_buffer, skip_bad, verify",
    "dali": "hw_decoder_load, initial_fill, net, prefetch, skip_bad, threads, verify",
}


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_every_loader_refuses_an_unknown_option_naming_the_accepted_ones(name: str, local_raw: Path) -> None:
    if loaders.unavailable(name):
        pytest.skip(str(loaders.unavailable(name)))
    with pytest.raises(FeedrateError) as caught:
        make_loader(name, config(local_raw, options={"skip_bad": True, "anything": 1}))
    assert str(caught.value) == f"unknown {name} option 'anything'; accepted: {ACCEPTED[name]}"
    with pytest.raises(FeedrateError, match=rf"^{name} option skip_bad='maybe'; accepted: true, false$"):
        make_loader(name, config(local_raw, options={"skip_bad": "maybe"}))


@pytest.mark.parametrize(
    ("name", "given", "parsed"),
    [
        ("torchvision", {"skip_bad": "true"}, {"skip_bad": True}),
        ("tensor", {"skip_bad": "No"}, {"skip_bad": False}),
        ("wds", {"verify": "yes", "shuffle_buffer": "8", "prefetch": "auto"},
         {"verify": True, "shuffle_buffer": 8, "prefetch": None}),
        ("dali", {"threads": "3", "skip_bad": "0", "hw_decoder_load": "0.5"},
         {"threads": 3, "skip_bad": False, "hw_decoder_load": 0.5}),
    ],
)  # fmt: skip
def test_string_booleans_and_counts_parse(name: str, given: dict, parsed: dict, local_raw: Path) -> None:
    if loaders.unavailable(name):
        pytest.skip(str(loaders.unavailable(name)))
    loader = make_loader(name, config(local_raw, options=given))
    try:
        options = loader.options if isinstance(loader.options, dict) else vars(loader.options)
        assert {key: options[key] for key in parsed} == parsed
        assert read_epoch(loader) == TRAIN
    finally:
        loader.close()


# -- one epoch seed ---------------------------------------------------------------------------------------
def test_the_epoch_seed_is_a_function_of_every_part_and_fits_its_width() -> None:
    base = epoch_seed(7, 2, 1, 3, ORDER)
    assert epoch_seed(7, 2, 1, 3, ORDER) == base
    others = {epoch_seed(*parts) for parts in [(8, 2, 1, 3, ORDER), (7, 3, 1, 3, ORDER), (7, 2, 0, 3, ORDER),
                                                (7, 2, 1, 4, ORDER), (7, 2, 1, 3, AUGMENT)]}  # fmt: skip
    assert base not in others and len(others) == 5
    assert epoch_seed(0, 1_000_003) != epoch_seed(1, 0)  # the old linear formula made these equal
    assert all(0 <= epoch_seed(s, e, bits=31) < 2**31 for s in range(5) for e in range(5))
    assert all(0 <= epoch_seed(-s, e) < 2**63 for s in range(5) for e in range(5))
