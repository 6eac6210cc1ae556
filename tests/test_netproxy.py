"""The shaping proxy (rig/netproxy.py) imposes the link it is given, measured from the client's side.

Real sockets end to end: a plain HTTP client -> the proxy -> the moto server. Objects are uploaded
public-read straight to moto, so the client needs no signing and every millisecond it measures is the
proxy's or the server's. Time to first byte is from sending the request to having the response head;
throughput is body bytes over the time from the head to the last byte. Each figure is a median or a
run of about a second, compared with the setting at 10%: the pacing is scheduled against clocks, so
on a busy machine a late wake-up costs one chunk, not a drift.
"""

from __future__ import annotations

import http.client
import math
import os
import re
import select
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from feedrate.network import LOOPBACK, MB, PRESETS, Link
from rig import locals3
from rig.netproxy import Answer, Exchange, NetProxy, Reset

ROOT = Path(__file__).resolve().parent.parent
TOL = 0.10  # the tolerance on every shaped figure
# First-byte latency under test. A busy 2-core machine adds a few ms of scheduling to any exchange (the
# client's, the proxy's and the server's threads each wait for a core): 10% of 100 ms holds under load,
# 10% of 20 ms would not.
LATENCY = 0.100


@dataclass
class Got:
    """One GET as the client saw it (time.monotonic() seconds)."""

    status: int
    body: bytes
    sent: float  # request handed to the socket
    head: float  # response head parsed
    end: float  # last body byte read

    @property
    def ttfb(self) -> float:
        return self.head - self.sent

    @property
    def rate(self) -> float:
        """Body bytes/s from the head to the last byte."""
        return len(self.body) / (self.end - self.head)


def port_of(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def connect(endpoint: str) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection("127.0.0.1", port_of(endpoint), timeout=30)
    conn.connect()  # timed requests measure the exchange, not the TCP handshake
    return conn


def get(conn: http.client.HTTPConnection, path: str, headers: dict[str, str] | None = None) -> Got:
    sent = time.monotonic()
    conn.request("GET", path, headers=headers or {})
    response = conn.getresponse()
    head = time.monotonic()
    body = response.read()
    return Got(response.status, body, sent, head, time.monotonic())


def put_public(endpoint: str, bucket: str, key: str, body: bytes) -> str:
    """Upload `body` straight to the server, readable without credentials; its path for a plain GET."""
    s3 = locals3.client(endpoint)
    s3.put_object(Bucket=bucket, Key=key, Body=body, ACL="public-read")
    return f"/{bucket}/{key}"


def link(
    latency_s: float = 0.0, jitter_s: float = 0.0, conn: float = math.inf, total: float = math.inf
) -> Link:
    return Link("test", latency_s, jitter_s, conn, total)


def assert_near(measured: float, setting: float, what: str, rel: float = TOL) -> None:
    assert abs(measured - setting) <= rel * setting, f"{what}: measured {measured:.4g}, setting {setting:.4g}"


def test_time_to_first_byte_is_the_setting_not_setting_plus_server(s3_env, bucket: str) -> None:
    path = put_public(s3_env.endpoint, bucket, "small.bin", os.urandom(1000))
    with NetProxy(s3_env.endpoint, link=link(latency_s=LATENCY)) as proxy:
        conn = connect(proxy.endpoint)
        got = [get(conn, path) for _ in range(7)]
        assert all(g.status == 200 for g in got)
        ttfb = statistics.median(g.ttfb for g in got)
        print(f"\nTTFB median {ttfb * 1e3:.2f} ms (setting {LATENCY * 1e3:g} ms)")
        assert_near(ttfb, LATENCY, "median time to first byte, s")
        # Never early: the head waits for the drawn latency counted from the request's arrival.
        assert min(g.ttfb for g in got) >= LATENCY
        # The proxy's own view: it held each head for the setting and no more than a little longer.
        held = [e.first_byte - e.arrived for e in proxy.requests("GET", path)]
        assert len(held) == 7 and min(held) >= LATENCY
        assert_near(statistics.median(held), LATENCY, "median head held by the proxy, s")

        proxy.link = None  # re-shaped between runs: the next requests are relayed unshaped
        fast = statistics.median(get(conn, path).ttfb for _ in range(5))
        conn.close()
    assert fast < LATENCY / 2, f"unshaped TTFB {fast * 1e3:.1f} ms"


def test_one_connection_gets_conn_bps(s3_env, bucket: str) -> None:
    size, rate = 2 * MB, 6 * MB  # ~1/3 s a GET, three GETs
    body = os.urandom(size)
    path = put_public(s3_env.endpoint, bucket, "big.bin", body)
    with NetProxy(s3_env.endpoint, link=link(conn=rate)) as proxy:
        conn = connect(proxy.endpoint)
        got = [get(conn, path) for _ in range(3)]
        conn.close()
    assert all(g.body == body for g in got)
    measured = statistics.median(g.rate for g in got)
    print(f"\nper-connection {measured / MB:.3f} MB/s (setting {rate / MB:g} MB/s)")
    assert_near(measured, rate, "one connection's throughput, B/s")


def test_connections_share_total_bps(s3_env, bucket: str) -> None:
    n, size = 4, 1 * MB
    conn_bps, total_bps = 2 * MB, 4 * MB  # 4 x 2 MB/s wanted, 4 MB/s to share: ~1 s in all
    body = os.urandom(size)
    path = put_public(s3_env.endpoint, bucket, "shared.bin", body)
    got: list[Got] = []
    with NetProxy(s3_env.endpoint, link=link(conn=conn_bps, total=total_bps)) as proxy:
        conns = [connect(proxy.endpoint) for _ in range(n)]
        start = threading.Barrier(n)

        def fetch(conn: http.client.HTTPConnection) -> None:
            start.wait()
            got.append(get(conn, path))

        threads = [threading.Thread(target=fetch, args=(c,)) for c in conns]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        for c in conns:
            c.close()
    assert len(got) == n and all(g.body == body for g in got)
    summed = n * size / (max(g.end for g in got) - min(g.head for g in got))
    print(f"\naggregate {summed / MB:.3f} MB/s (setting {total_bps / MB:g} MB/s)")
    assert_near(summed, total_bps, "summed throughput, B/s")
    # Shared fairly: no connection ran at its own cap while the others waited.
    assert all(g.rate <= total_bps / n * (1 + TOL) for g in got), [round(g.rate / MB, 3) for g in got]


def test_jitter_spreads_first_bytes_over_latency_plus_minus_jitter(s3_env, bucket: str) -> None:
    latency, jitter = LATENCY, LATENCY / 2
    slack = TOL * latency  # the client's and the proxy's own time on top of a draw, at most
    path = put_public(s3_env.endpoint, bucket, "small.bin", os.urandom(1000))
    with NetProxy(s3_env.endpoint, link=link(latency, jitter), seed=7) as proxy:
        conn = connect(proxy.endpoint)
        got = [get(conn, path) for _ in range(12)]
        conn.close()
        drawn = [e.latency_s for e in proxy.requests("GET", path)]
    ttfb = [g.ttfb for g in got]
    setting = f"{latency * 1e3:g} +- {jitter * 1e3:g} ms"
    print(f"\nTTFB with jitter: {min(ttfb) * 1e3:.1f}..{max(ttfb) * 1e3:.1f} ms (setting {setting})")
    assert all(latency - jitter <= d <= latency + jitter for d in drawn)
    assert all(latency - jitter <= t <= latency + jitter + slack for t in ttfb), ttfb
    assert max(ttfb) - min(ttfb) > jitter, "the latency varies across the range, not around one value"
    # Each request got its own draw: measured and drawn agree request by request.
    late = [t - d for t, d in zip(ttfb, drawn, strict=True)]
    assert min(late) >= 0 and statistics.median(late) <= slack, late

    # The same seed draws the same latencies; another seed, others.
    again, other = NetProxy(s3_env.endpoint, seed=7), NetProxy(s3_env.endpoint, seed=8)
    try:
        shaped = link(latency, jitter)
        assert [again._draw_latency(shaped) for _ in drawn] == drawn
        assert [other._draw_latency(shaped) for _ in drawn] != drawn
    finally:
        again.close()
        other.close()


@pytest.mark.parametrize(
    "shaping",
    [None, LOOPBACK, link(0.005, 0.003, conn=40 * MB, total=60 * MB)],
    ids=["none", "loopback", "shaped"],
)
def test_bodies_arrive_byte_identical(s3_env, bucket: str, shaping: Link | None) -> None:
    body = os.urandom(3 * MB + 12345)  # not a multiple of any chunk size
    path = put_public(s3_env.endpoint, bucket, "same.bin", body)
    with NetProxy(s3_env.endpoint, link=shaping) as proxy:
        conn = connect(proxy.endpoint)
        whole = get(conn, path)
        part = get(conn, path, {"Range": "bytes=1000-2100000"})
        conn.close()
        # An upload relayed through the proxy reaches the server intact as well.
        put_public(proxy.endpoint, bucket, "up.bin", body[::-1])
    assert whole.status == 200 and whole.body == body
    assert part.status == 206 and part.body == body[1000:2100001]
    direct = connect(s3_env.endpoint)
    assert get(direct, f"/{bucket}/up.bin").body == body[::-1]
    direct.close()


@pytest.mark.parametrize("shaping", [None, LOOPBACK], ids=["none", "loopback"])
def test_an_unshaped_proxy_never_sleeps(
    s3_env, bucket: str, shaping: Link | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    waits: list[float] = []
    monkeypatch.setattr(Exchange, "wait_until", lambda self, deadline: waits.append(deadline))
    monkeypatch.setattr(NetProxy, "_reserve", lambda self, *a, **kw: waits.append(0.0) or 0.0)
    body = os.urandom(2 * MB)
    path = put_public(s3_env.endpoint, bucket, "fast.bin", body)
    with NetProxy(s3_env.endpoint, link=shaping) as proxy:
        conn = connect(proxy.endpoint)
        got = get(conn, path)
        conn.close()
        entry = proxy.requests("GET", path)[0]
    assert got.body == body and waits == []
    assert entry.latency_s == 0.0 and entry.body_bytes == len(body)


def test_faults_compose_with_shaping(s3_env, bucket: str) -> None:
    latency, rate, cut = LATENCY, 1 * MB, 200_000  # the cut comes ~0.2 s after the head
    path = put_public(s3_env.endpoint, bucket, "cut.bin", os.urandom(1 * MB))
    with NetProxy(s3_env.endpoint, link=link(latency, conn=rate)) as proxy:
        proxy.add(Answer(path_contains="cut.bin", times=3))
        proxy.add(Reset(path_contains="cut.bin", after_bytes=cut))
        conn = connect(proxy.endpoint)
        refused = [get(conn, path) for _ in range(3)]  # a shaped store's 503 is as slow as any answer
        assert [r.status for r in refused] == [503] * 3
        assert_near(statistics.median(r.ttfb for r in refused), latency, "503's time to first byte, s")

        sent = time.monotonic()
        conn.request("GET", path)
        response = conn.getresponse()
        head = time.monotonic()
        with pytest.raises((ConnectionError, http.client.IncompleteRead)):
            response.read()
        broken = time.monotonic()
        conn.close()
    assert head - sent >= latency
    # What the fault relayed paid for its bandwidth: the reset came when the cut bytes had gone out.
    assert_near(broken - head, cut / rate, "time to the reset, s")
    assert [e.fault for e in proxy.requests("GET", path)] == ["Answer"] * 3 + ["Reset"]


# -- the command line ---------------------------------------------------------------------------------
def start_cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "rig.netproxy", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def first_line(proc: subprocess.Popen[str], timeout_s: float = 20.0) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    assert ready, "the proxy printed no endpoint line"
    assert proc.stdout is not None
    return proc.stdout.readline()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_cli_serves_until_a_signal(s3_env, bucket: str, signum: int) -> None:
    body = os.urandom(300_000)
    path = put_public(s3_env.endpoint, bucket, "cli.bin", body)
    proc = start_cli("--upstream", s3_env.endpoint, "--net", "same-region", "--seed", "3")
    try:
        line = first_line(proc)
        match = re.fullmatch(r"endpoint (http://127\.0\.0\.1:\d+)\n", line)
        assert match, line
        conn = connect(match.group(1))
        got = get(conn, path)
        conn.close()
        assert got.status == 200 and got.body == body
        same_region = PRESETS["same-region"]
        assert got.ttfb >= same_region.latency_s - same_region.jitter_s
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert out == "" and err == "", "one line on stdout, nothing else"


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--net", "moon-base"], ["'moon-base'", *PRESETS]),
        (["--net", "home", "--upstream", "http://example.com:80"], ["example.com", "127.0.0.1"]),
        (["--net", "home", "--upstream", "https://127.0.0.1:9000"], ["https://127.0.0.1:9000"]),
    ],
    ids=["preset", "remote", "https"],
)
def test_cli_bad_input_is_one_line_and_exit_2(args: list[str], named: list[str]) -> None:
    if "--upstream" not in args:
        args = ["--upstream", "http://127.0.0.1:9", *args]
    proc = start_cli(*args)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("netproxy: error: "), err
    for word in named:
        assert word in lines[0]
