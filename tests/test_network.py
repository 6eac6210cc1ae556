"""Network presets and prefetch planning: depths follow the bandwidth-delay product and scale with the
preset, loaders measure the link they read through (a shaping proxy in front of a real S3 server), and a
loader behind the cross-region preset still yields every sample exactly once."""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path

import pytest

from feedrate import network
from feedrate.errors import FeedrateError
from loaders import LoaderConfig, make_loader
from loaders.streaming import WdsLoader
from rig.netproxy import NetProxy
from tests.helpers import all_keys, build_coded, config, epoch

MB = network.MB
JPG_SHARD = 10_200_000  # a 2,500-sample jpg shard of synthetic CIFAR (README, shard sizes)
JPG_SAMPLE = JPG_SHARD / 2_500


def depth(link: network.Link, readers: int = 2) -> int:
    return network.prefetch_depth(link, JPG_SHARD, network.DEFAULT_DEMAND_IMG_S * JPG_SAMPLE, readers)


def test_depth_is_the_bandwidth_delay_product() -> None:
    # 1 MB shards taking 0.1 s + 1 MB / 10 MB/s = 0.2 s each; 30 MB/s wanted -> 6 MB in flight = 6 shards
    link = network.Link("t", 0.1, 0.0, 10 * MB, math.inf)
    assert network.prefetch_depth(link, 1 * MB, 30 * MB, readers=1) == 6
    assert network.prefetch_depth(link, 1 * MB, 30 * MB, readers=3) == 2, "readers share the demand"
    # a shared link slower than the demand caps the depth at what fills the link: 5 MB/s x (0.1 s +
    # 1 MB / 5 MB/s) = 1.5 MB in flight
    narrow = network.Link("t", 0.1, 0.0, 10 * MB, 5 * MB)
    assert network.prefetch_depth(narrow, 1 * MB, 30 * MB, readers=1) == 2
    # never 0, never past the limit or the memory budget
    assert network.prefetch_depth(network.LOOPBACK, 1 * MB, 30 * MB) == 1
    assert network.prefetch_depth(network.Link("t", 10.0, 0.0, 1 * MB, math.inf), 1 * MB, 1e9) == 16
    huge = network.PREFETCH_MEMORY // 2
    assert network.prefetch_depth(network.Link("t", 10.0, 0.0, 1 * MB, math.inf), huge, 1e12) == 2


def test_prefetch_scales_with_the_preset() -> None:
    same, cross, home = (network.preset(n) for n in ("same-region", "cross-region", "home"))
    assert depth(network.LOOPBACK) == 1
    assert depth(same) == 2 and depth(cross) == 4, "more latency, fewer MB/s per connection: deeper"
    assert depth(home) == 1, "a 12.5 MB/s link is full with one fetch: more depth only holds memory"
    # copying a split up front: enough GETs to fill each link's shared bandwidth
    files = 20
    conc = {n: network.fetch_concurrency(network.preset(n), JPG_SHARD, files) for n in network.PRESETS}
    assert conc["home"] == 2 < conc["same-region"] <= conc["cross-region"] <= files
    assert network.fetch_concurrency(network.LOOPBACK, JPG_SHARD, files) == 8, "unknown: the default"


def test_measured_link_from_timed_gets() -> None:
    # (first byte s, bytes, body s, first body byte at, last body byte at)
    one_at_a_time = [
        (0.05, 2_000_000, 0.2, 0.0, 0.2),
        (0.07, 2_000_000, 0.25, 1.0, 1.25),
        (0.06, 500_000, 0.5, 2, 3),
    ]
    link = network.measured(one_at_a_time)
    assert link is not None and link.latency_s == pytest.approx(0.06)
    assert link.conn_bps == pytest.approx(10 * MB), (
        "the fastest body of 1 MiB or more; smaller ones do not count"
    )
    assert link.total_bps == pytest.approx(4_000_000 / 0.45), "bytes over the time a body was arriving"
    # two bodies at once, each at 10 MB/s: together 20 MB/s
    overlapping = [(0.05, 2_000_000, 0.2, 0.0, 0.2), (0.05, 2_000_000, 0.2, 0.0, 0.2)]
    assert network.measured(overlapping).total_bps == pytest.approx(20 * MB)  # type: ignore[union-attr]
    assert network.measured([]) is None
    small = network.measured([(0.01, 10, 0.001, 0.0, 0.001)])
    assert small is not None and math.isinf(small.conn_bps) and math.isinf(small.total_bps)


def test_measured_depth_probes_up_on_a_free_link_and_holds_on_a_full_one() -> None:
    """Re-planning from what k fetches at once achieved: on a link with room, k fetches bring k times
    the bytes and the depth grows to what the demand needs; on a full link it stays put."""
    shard, demand, latency, conn = 10 * MB, 100 * MB, 0.09, 40 * MB

    def next_depth(k: int, link_cap: float) -> int:
        each = min(conn, link_cap / k)  # k fetches share the link
        t = shard / each
        gets = [(latency, shard, t, 0.0, t)] * k
        alone = min(conn, link_cap)  # what the first fetch, on its own, got
        link = network.measured(gets, peak_conn_bps=alone)
        return network.prefetch_depth(link, shard, demand)  # type: ignore[arg-type]

    k, seen = 1, []
    for _ in range(6):
        k = next_depth(k, link_cap=math.inf)
        seen.append(k)
    assert seen == sorted(seen) and seen[-1] == network.prefetch_depth(
        network.Link("t", latency, 0, conn, math.inf), shard, demand
    ), f"slow start up to the demand's depth: {seen}"
    assert next_depth(4, link_cap=12.5 * MB) <= 2, "a full 12.5 MB/s link: no deeper than fills it"


def test_unknown_preset_names_the_accepted_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FeedrateError, match=r"'moon'.*accepted: loopback, same-region, cross-region, home"):
        network.preset("moon")
    monkeypatch.setenv(network.NET_ENV, "moon")
    with pytest.raises(FeedrateError, match="moon"):
        network.from_env()
    with pytest.raises(FeedrateError, match="moon"):
        network.Link("moon", 0.01, 0.02, 1.0, 1.0)  # jitter above the latency


# -- loaders through the shaping proxy ----------------------------------------------------------------
def tar_gets(proxy: NetProxy) -> list[str]:
    return [e.path for e in proxy.requests("GET") if e.path.split("?")[0].endswith(".tar")]


@pytest.fixture
def shaped(s3_env, monkeypatch: pytest.MonkeyPatch):
    """A shaping proxy in front of the S3 server; the SDKs pointed at it."""
    monkeypatch.delenv(network.NET_ENV, raising=False)
    with NetProxy(s3_env.endpoint, seed=1) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        monkeypatch.setenv("COS_ENDPOINT", proxy.endpoint)
        yield proxy


@pytest.mark.parametrize("scheme", ["s3", "cos"])
def test_wds_under_cross_region_yields_every_sample_once(
    scheme: str, bucket: str, shaped: NetProxy, tmp_path: Path
) -> None:
    url = f"{scheme}://{bucket}/ds"
    build_coded(tmp_path / "ds", "raw", shard_size=8, train=40, test=5, url=url)  # written unshaped
    shaped.link = network.preset("cross-region")
    with WdsLoader(config(url, workers=2)) as loader:
        plan = loader.prefetch_plan
        assert plan["source"] == "measured"
        cross = network.preset("cross-region")
        # the loader's estimate of the latency: the median first byte of its index reads. The proxy never
        # answers sooner than the preset; the client may see it later on a busy 2-core machine (up to
        # ~0.5 s seen under the whole test suite), which only plans deeper.
        low = cross.latency_s - cross.jitter_s
        assert low * 1e3 <= plan["link"]["latency_ms"] <= 2_000
        assert plan["depth"] > 1, "latency with tiny shards: several fetches in flight"
        for e in range(2):
            keys, _, _ = epoch(loader, e)
            assert Counter(keys) == Counter(all_keys(40)), f"epoch {e}: duplicates or missing samples"
            if e == 0:  # the readers have started on epoch 1's first shards: 5 shards read, and more
                deadline = time.monotonic() + 5
                while len(tar_gets(shaped)) <= 5 and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert len(tar_gets(shaped)) > 5, "no read-ahead across the epoch boundary"
        assert len(tar_gets(shaped)) <= 15, "at most the third epoch's shards read ahead"


def test_named_preset_overrides_the_measurement(
    bucket: str, shaped: NetProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"s3://{bucket}/ds"
    build_coded(tmp_path / "ds", "raw", shard_size=10, train=20, test=5, url=url)
    with WdsLoader(config(url, workers=0, options={"keys": True, "net": "home"})) as loader:
        assert loader.prefetch_plan["source"] == "option" and loader.prefetch_plan["link"]["name"] == "home"
    monkeypatch.setenv(network.NET_ENV, "cross-region")
    with WdsLoader(config(url, workers=0)) as loader:
        assert loader.prefetch_plan["source"] == network.NET_ENV
        assert loader.prefetch_plan["link"]["name"] == "cross-region"
    with WdsLoader(config(url, workers=0, options={"keys": True, "prefetch": "3"})) as loader:
        assert loader.prefetch_plan == {"depth": 3, "source": "option"}
    with pytest.raises(FeedrateError, match=r"prefetch='deep'; accepted: auto or an integer >= 0"):
        WdsLoader(config(url, workers=0, options={"prefetch": "deep"}))
    with pytest.raises(FeedrateError, match="'moon'"):
        WdsLoader(config(url, workers=0, options={"net": "moon"}))


def test_local_data_plans_no_network(tmp_path: Path) -> None:
    root = build_coded(tmp_path / "ds", "raw", shard_size=10, train=20, test=5)
    with WdsLoader(config(root, workers=0)) as loader:
        assert loader.prefetch_plan == {"depth": 1, "source": "local"}


def test_batch_reader_under_cross_region_fetches_concurrently(
    bucket: str, shaped: NetProxy, tmp_path: Path
) -> None:
    """The torchvision baseline copies the CIFAR batches up front, several GETs at once, and gets every
    sample: same labels, same count as on local disk."""
    url = f"s3://{bucket}/ds"
    local = build_coded(tmp_path / "ds", "raw", shard_size=10, train=30, test=5)
    build_coded(tmp_path / "ds2", "raw", shard_size=10, train=30, test=5, url=url)
    shaped.link = network.preset("cross-region")
    cfg = dict(split="train", batch_size=8, train=False, workers=0)
    remote = make_loader("torchvision", LoaderConfig(data=url, **cfg))
    here = make_loader("torchvision", LoaderConfig(data=str(local), **cfg))
    assert remote.prefetch_plan["source"] == "measured"
    assert remote.prefetch_plan["concurrency"] > 1
    labels = lambda loader: Counter(int(y) for _, ys in loader for y in ys)  # noqa: E731
    assert labels(remote) == labels(here) and sum(labels(remote).values()) == 30


def test_read_ahead_spills_into_the_next_pass_but_never_loads_one_item_twice_at_once() -> None:
    """stages.prefetched with `spill`: once this pass's items are all submitted, the next pass's first
    items start loading; an item still loading for this pass waits (the same shard is not fetched twice
    at once, and a fault on it is met by this pass)."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Event, Lock

    from loaders.stages import prefetched

    started: list[str] = []
    gates: dict[str, Event] = {name: Event() for name in "abcd"}
    lock = Lock()

    def load(item: str) -> str:
        with lock:
            started.append(item)
        assert gates[item].wait(10)
        return item

    with ThreadPoolExecutor(max_workers=4) as pool:
        # the next pass starts with an item this one is still loading: nothing spills until it is done
        spilled: list = []
        passes = prefetched(["a", "b"], load, pool, 4, spill=(["b", "c"], spilled))
        gates["a"].set()
        assert next(passes) == "a"
        time.sleep(0.2)
        assert started.count("b") == 1 and not spilled, "b is loading for this pass: not started again"
        gates["b"].set()
        assert next(passes) == "b"
        assert next(passes, None) is None
        # the next pass's items differ from what is loading: they start before this pass is drained
        started.clear()
        for gate in gates.values():
            gate.clear()
        spilled = []
        passes = prefetched(["a", "b"], load, pool, 4, spill=(["c", "d"], spilled))
        gates["a"].set()
        assert next(passes) == "a"
        deadline = time.monotonic() + 5
        while len(started) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(started) == ["a", "b", "c", "d"] and len(spilled) == 2, "c and d read ahead"
        for gate in gates.values():
            gate.set()
        assert next(passes) == "b" and [f.result() for f in spilled] == ["c", "d"]


def test_read_ahead_lead_fills_the_next_pass_buffer_beyond_the_depth() -> None:
    """stages.prefetched's `lead`: at depth 1 only one of the next pass's loads would be in flight at
    the boundary, while its shuffle buffer needs two units before its first draw; `lead=2` starts both,
    and never more (the third waits for the next pass itself)."""
    from concurrent.futures import ThreadPoolExecutor

    from loaders.stages import prefetched

    def load(item: str) -> str:
        return item

    for lead, expected in ((0, ["c"]), (2, ["c", "d"])):
        with ThreadPoolExecutor(max_workers=4) as pool:
            spilled: list = []
            out = list(prefetched(["a", "b"], load, pool, 1, spill=(["c", "d", "e"], spilled), lead=lead))
            assert out == ["a", "b"]
            assert [f.result() for f in spilled] == expected
