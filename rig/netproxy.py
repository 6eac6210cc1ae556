"""A loopback HTTP/1.1 proxy that shapes the network and injects faults between an SDK and a local server.

A local S3 endpoint (moto, `make s3-up`) answers in microseconds over loopback; a real object store takes
tens of milliseconds to its first byte and caps each connection's bandwidth. `NetProxy` sits between the
SDKs and the local server so that loaders meet the network they will meet in production, and so that
tests can break that network on purpose. The SDKs talk to `NetProxy.endpoint`; the proxy relays each
exchange to the upstream server and back.

Shaping (`link`: a `feedrate.network.Link`), applied to every response the proxy sends:

- first-byte latency: each request draws `latency +- jitter` (uniform, from the proxy's `seed`); the
  response head leaves no earlier than that long after the request arrived. The upstream's own time is
  part of the draw, not added to it, so a client measures the setting as its time to first byte.
- bandwidth: the response body goes out in chunks paced by two virtual clocks, one per client connection
  (`conn_bps`) and one shared by all connections (`total_bps`). Each chunk reserves its transfer time on
  both and is sent when the later of the two says it is done. Scheduling against the clocks (not against
  the previous sleep's end) keeps sleep overshoot from accumulating: a transfer that fell behind by its
  own late wake-ups catches up (by CATCH_UP_S at most). Idle time earns no credit: a response's first
  chunk starts on the clocks from now, so a connection that waited cannot burst.
- request bodies (uploads) are not shaped: reading is what loaders do, and what the figures are about.

Faults (`add(fault)`), for requests that a `Fault` matches, compose with shaping (what a fault relays
still pays latency and bandwidth):

- `Answer`: a status of its own instead of the server's (503 SlowDown by default);
- `Reset`: relay the response head and part of its body, then reset the connection (RST: bytes still
  in flight may be lost, as when a middlebox or a crashed server drops it);
- `Truncate`: the same with a plain close (FIN): the head promised a Content-Length, fewer bytes come;
- `Stall`: relay the head and part of the body (or nothing at all), then send nothing for longer than
  the client's read timeout, and drop the connection once the client has given up;
- `CutRequest`: read part of the request body (an upload), then reset the connection: the client's
  send breaks mid-body and the server never sees the request.

Every request is logged (`requests(method, path_contains)`) with the fault that hit it and its timing, so
a test can check what the client did (how many GETs, which Range it asked for on a resume) and what the
proxy imposed; `injected` counts the faults served.

Extending it: a fault is a small class with `serve(exchange) -> bool` (True: keep the client connection
for the next request). `Exchange` offers the building blocks: `forward(body_limit=..., pace=...)`
relays the request and the response, `reply(...)` answers without the upstream, `read_body(limit)` reads
the request body (answering `Expect: 100-continue` itself), `abort()` resets the connection.

Requests are relayed one upstream connection each; request bodies must carry a Content-Length (the
SDKs' reads, puts and part uploads do). The proxy listens on 127.0.0.1 only and relays only to a
loopback upstream: it never sends traffic off the machine.

`python -m rig.netproxy --upstream http://127.0.0.1:PORT --net PRESET` runs one in the foreground:
it prints `endpoint http://127.0.0.1:NNNN` and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import contextlib
import errno
import math
import random
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from feedrate.errors import CliParser, FeedrateError, run_cli
from feedrate.network import PRESETS, Link, preset

HOST = "127.0.0.1"
CHUNK = 64 * 1024  # socket reads (a shaped chunk is up to 4 of them)
MIN_SHAPED_CHUNK = 16 * 1024
# A shaped chunk carries about this much transfer time: short enough that pacing is smooth, long
# enough that a sleep per chunk costs little (clamped to MIN_SHAPED_CHUNK..4 x CHUNK: at 90 MB/s, 256 KiB
# chunks cut the proxy's CPU per MB by a third against 64 KiB ones).
SHAPED_CHUNK_S = 0.004
# How far behind its schedule a transfer may fall (late wake-ups on a busy machine) and still catch up:
# at 90 MB/s a 64 KiB chunk lasts 0.7 ms, less than one time slice of a loaded 2-core box.
CATCH_UP_S = 0.010
LOOPBACK_HOSTS = {"127.0.0.1": HOST, "localhost": HOST}


def upstream_address(url: str) -> tuple[str, int]:
    """(host, port) of an http:// upstream on this machine; anything else is a one-line error, because
    the proxy exists to imitate a remote store locally, never to reach one."""
    try:
        parts = urlsplit(url)
        port = parts.port or 80
    except ValueError:
        raise FeedrateError(f"upstream {url!r} is not a valid URL; accepted: http://127.0.0.1:PORT") from None
    host = (parts.hostname or "").lower()
    if parts.scheme != "http" or host not in LOOPBACK_HOSTS or parts.path not in ("", "/"):
        raise FeedrateError(
            f"upstream {url!r} is not a local endpoint; accepted: http://127.0.0.1:PORT or "
            "http://localhost:PORT (the proxy never relays off this machine)"
        )
    return LOOPBACK_HOSTS[host], port


class _Peer:
    """A socket with a read buffer: HTTP heads are read up to their blank line, bodies by length."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def read_head(self) -> bytes | None:
        while b"\r\n\r\n" not in self.buf:
            data = self.sock.recv(CHUNK)
            if not data:
                return None
            self.buf += data
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        return head + b"\r\n\r\n"

    def read_some(self, limit: int) -> bytes:
        if self.buf:
            data, self.buf = self.buf[:limit], self.buf[limit:]
            return data
        return self.sock.recv(min(limit, CHUNK))

    def read_into(self, view: memoryview) -> int:
        """Fill `view` (fewer bytes when the peer closes first); the bytes read. Received straight into
        the caller's buffer: a shaped relay moves every body byte through here, and on a 2-core machine
        the proxy's CPU is taken from the loaders it measures."""
        n = 0
        if self.buf:
            n = min(len(self.buf), len(view))
            view[:n] = self.buf[:n]
            self.buf = self.buf[n:]
        while n < len(view):
            got = self.sock.recv_into(view[n:])
            if not got:
                break
            n += got
        return n

    def read_exact(self, n: int) -> bytes:
        parts = []
        while n > 0:
            data = self.read_some(n)
            if not data:
                raise ConnectionError("peer closed mid-message")
            parts.append(data)
            n -= len(data)
        return b"".join(parts)

    def read_line(self) -> bytes:
        while b"\r\n" not in self.buf:
            data = self.sock.recv(CHUNK)
            if not data:
                raise ConnectionError("peer closed mid-line")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line + b"\r\n"

    def close(self, reset: bool = False) -> None:
        if reset:  # RST instead of FIN: the client sees "connection reset by peer"
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            self.sock.close()


@dataclass
class Message:
    """A parsed HTTP head: the start line and the headers (names lower-cased)."""

    start: str
    headers: dict[str, str]
    raw: bytes

    @classmethod
    def parse(cls, raw: bytes) -> Message:
        lines = raw.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        return cls(lines[0], headers, raw)

    @property
    def method(self) -> str:
        return self.start.split(" ", 1)[0]

    @property
    def path(self) -> str:
        parts = self.start.split(" ")
        return parts[1] if len(parts) > 1 else ""

    @property
    def status(self) -> int:
        return int(self.start.split(" ")[1])


@dataclass
class LogEntry:
    """One request as the proxy saw it. Times are time.monotonic() seconds in the proxy's process."""

    method: str
    path: str
    range: str | None
    fault: str | None
    arrived: float = 0.0  # the request head was read
    latency_s: float = 0.0  # the first-byte latency drawn for it (0: unshaped)
    first_byte: float | None = None  # the response head was sent (None: no answer)
    done: float | None = None  # the whole response body was relayed
    body_bytes: int = 0  # response body bytes relayed


@dataclass
class _ConnClock:
    """A client connection's bandwidth clock: when its link is free again (monotonic seconds)."""

    t: float = 0.0


class Exchange:
    """One request from the client, with the means to answer it (relayed or not), shaped by `link`."""

    def __init__(
        self,
        proxy: NetProxy,
        client: _Peer,
        request: Message,
        link: Link | None = None,
        clock: _ConnClock | None = None,
        entry: LogEntry | None = None,
    ) -> None:
        self.proxy = proxy
        self.client = client
        self.request = request
        self.body: bytes | None = None  # read on demand: a fault may cut it short
        self.upstream: _Peer | None = None
        self._continued = False
        self.link = link if link is not None and link.shaped else None
        self.clock = clock if clock is not None else _ConnClock()
        self.entry = entry
        self.received = entry.arrived if entry is not None else time.monotonic()
        self.latency_s = entry.latency_s if entry is not None else proxy._draw_latency(self.link)
        self._paced = self.link is not None and not (
            math.isinf(self.link.conn_bps) and math.isinf(self.link.total_bps)
        )

    @property
    def body_length(self) -> int:
        return int(self.request.headers.get("content-length", "0"))

    def read_body(self, limit: int | None = None) -> bytes:
        """The request body (at most `limit` bytes of it). A client that sent `Expect: 100-continue`
        waits for a go-ahead before it sends the body: the proxy gives it, as the server would."""
        if self.body is not None:
            return self.body
        want = self.body_length if limit is None else min(limit, self.body_length)
        if (
            not self._continued
            and self.body_length
            and self.request.headers.get("expect", "").lower() == "100-continue"
        ):
            self.client.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            self._continued = True
        data = self.client.read_exact(want)
        if want == self.body_length:
            self.body = data
            if want:  # an upload's latency counts from its last byte, as the client's wait does
                self.received = time.monotonic()
        return data

    def wait(self, seconds: float) -> None:
        """Sleep `seconds`, or less when the proxy closes (a stalled test never outlives its proxy)."""
        self.proxy._released.wait(seconds)

    def wait_until(self, deadline: float) -> None:
        """Sleep until time.monotonic() reaches `deadline`, or less when the proxy closes."""
        remaining = deadline - time.monotonic()
        if remaining > 0:
            self.proxy._released.wait(remaining)

    def send_head(self, raw: bytes) -> None:
        """Send a response head (with whatever follows it in `raw`) once the drawn latency has passed
        since the request arrived: the upstream's own time is part of the latency, not added to it."""
        if self.latency_s > 0:
            self.wait_until(self.received + self.latency_s)
        self.client.sock.sendall(raw)
        if self.entry is not None:
            self.entry.first_byte = time.monotonic()

    def reply(self, status: int, reason: str, body: bytes = b"", close: bool = False) -> bool:
        """Answer the client directly, as the server would (after the link's latency); True when the
        connection stays open."""
        head = [
            f"HTTP/1.1 {status} {reason}",
            "Content-Type: application/xml",
            f"Content-Length: {len(body)}",
            f"Connection: {'close' if close else 'keep-alive'}",
        ]
        self.send_head(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        self._finished(len(body))
        return not close

    def abort(self, reset: bool = True) -> bool:
        """Drop the client connection (a reset by default, as a crashed server or middlebox would)."""
        self.client.close(reset=reset)
        return False

    def forward(
        self,
        body_limit: int | None = None,
        pace: Callable[[int], None] | None = None,
        reset: bool = True,
        before_cut: Callable[[], None] | None = None,
    ) -> bool:
        """Relay the request upstream and the response back.

        `body_limit`: relay only that many response body bytes, then drop the client connection: with a
        reset (RST: the client may lose bytes it had not read yet) or, `reset=False`, a plain close
        (FIN: every relayed byte reaches the client, then the body ends early).
        `pace(n)`: called before each relayed body chunk with the bytes relayed so far.
        `before_cut()`: called after the last byte relayed and before the connection drops (a stall).
        """
        body = self.read_body()
        upstream = self.proxy._connect_upstream()
        self.upstream = upstream
        try:
            upstream.sock.sendall(self.request.raw + body)
            response = self._final_head(upstream)
            if response is None:
                return self.abort()
            self.send_head(response.raw)
            sent = self._relay_body(upstream, response, body_limit, pace)
            if sent is None:
                if before_cut is not None:
                    before_cut()
                return self.abort(reset)
            self._finished(sent)
            keep = response.headers.get("connection", "").lower() != "close"
            return keep and not response.start.startswith("HTTP/1.0")
        finally:
            upstream.close()
            self.proxy._untrack(upstream)

    def _finished(self, body_bytes: int) -> None:
        if self.entry is not None:
            self.entry.body_bytes = body_bytes
            self.entry.done = time.monotonic()

    @staticmethod
    def _final_head(upstream: _Peer) -> Message | None:
        """The upstream's final response head: interim ones (100 Continue) are for the proxy, which
        already sent the whole body."""
        while True:
            raw = upstream.read_head()
            if raw is None:
                return None
            response = Message.parse(raw)
            if not 100 <= response.status < 200:
                return response

    def _relay_body(
        self, upstream: _Peer, response: Message, limit: int | None, pace: Callable[[int], None] | None
    ) -> int | None:
        """Bytes of body relayed, or None when the limit cut it short."""
        if self.request.method == "HEAD" or response.status in (204, 304) or response.status < 200:
            return 0
        if response.headers.get("transfer-encoding", "").lower() == "chunked":
            return self._relay_chunked(upstream)
        length = int(response.headers.get("content-length", "0"))
        chunk = self.proxy._chunk_size(self.link) if self._paced else 4 * CHUNK
        buffer = memoryview(bytearray(min(chunk, max(length, 1))))
        sent = 0
        while sent < length:
            if limit is not None and sent >= limit:
                if self.entry is not None:
                    self.entry.body_bytes = sent
                return None
            if pace:
                pace(sent)
            want = length - sent if limit is None else min(length, limit) - sent
            data = buffer[: upstream.read_into(buffer[: min(want, chunk)])]
            if data and self._paced:
                self.wait_until(self.proxy._reserve(self.clock, self.link, len(data), fresh=sent == 0))
            if not data:
                return None
            self.client.sock.sendall(data)
            sent += len(data)
        return sent

    def _relay_chunked(self, upstream: _Peer) -> int:
        sent = 0
        while True:
            line = upstream.read_line()
            size = int(line.split(b";")[0].strip(), 16)
            data = upstream.read_exact(size + 2)
            if self._paced and size:
                self.wait_until(self.proxy._reserve(self.clock, self.link, size, fresh=sent == 0))
            self.client.sock.sendall(line + data)
            sent += size
            if size == 0:
                return sent


@dataclass
class Fault:
    """Base fault: which requests it hits (method, a path substring) and how many times (None: all)."""

    method: str = "GET"
    path_contains: str = ""
    times: int | None = 1
    hits: int = field(default=0, init=False)
    label = "relayed"  # what the fault does, in words (the faults table)

    def matches(self, request: Message) -> bool:
        if request.method != self.method or self.path_contains not in request.path:
            return False
        return self.times is None or self.hits < self.times

    def serve(self, exchange: Exchange) -> bool:
        return exchange.forward()

    @property
    def name(self) -> str:
        return type(self).__name__


@dataclass
class Answer(Fault):
    """Answer with `status` (503 Slow Down by default) instead of relaying the request."""

    status: int = 503
    reason: str = "Service Unavailable"
    code: str = "SlowDown"
    label = "503 SlowDown"

    def serve(self, exchange: Exchange) -> bool:
        exchange.read_body()  # the client sends it whole before it reads an answer
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{self.code}</Code>'
            f"<Message>injected by netproxy</Message></Error>"
        ).encode()
        return exchange.reply(self.status, self.reason, body)


@dataclass
class CutBody(Fault):
    """Relay the response head and `after_bytes` of its body, then drop the connection: closed (the
    client gets every relayed byte) or, with `reset`, reset (bytes in flight may be lost)."""

    after_bytes: int = 4096
    reset: bool = False

    @property
    def label(self) -> str:  # type: ignore[override]
        return "reset mid-body" if self.reset else "truncated body"

    def serve(self, exchange: Exchange) -> bool:
        return exchange.forward(body_limit=self.after_bytes, reset=self.reset)


@dataclass
class Reset(CutBody):
    """A response body cut by a reset (RST) after `after_bytes`."""

    reset: bool = True


@dataclass
class Truncate(CutBody):
    """A response whose Content-Length promised more than it sends: `after_bytes`, then a plain close."""

    reset: bool = False


@dataclass
class Stall(Fault):
    """Send nothing for `seconds` (longer than the client's read timeout), then drop the connection.

    `after_bytes=None`: the request reaches no server and no answer comes (a hung server; for an
    upload, the client waits for the response to the body it sent). Else the response head and
    `after_bytes` of its body are relayed first (a transfer that stops mid-body).
    """

    after_bytes: int | None = None
    seconds: float = 30.0
    label = "stall past timeout"

    def serve(self, exchange: Exchange) -> bool:
        if self.after_bytes is None:
            exchange.read_body()
            exchange.wait(self.seconds)
            return exchange.abort(reset=False)
        return exchange.forward(
            body_limit=self.after_bytes, reset=False, before_cut=lambda: exchange.wait(self.seconds)
        )


@dataclass
class CutRequest(Fault):
    """Read `after_bytes` of the request body (an upload), then reset the connection: the request never
    reaches the server and the client's send (or its wait for an answer) breaks."""

    method: str = "PUT"
    after_bytes: int = 64 * 1024
    label = "reset mid-body"

    def serve(self, exchange: Exchange) -> bool:
        exchange.read_body(limit=self.after_bytes)
        return exchange.abort(reset=True)


class NetProxy:
    """Listen on 127.0.0.1 (`port`, 0: a free one) and relay to `upstream` (a loopback http:// endpoint),
    shaped by `link` (None: as fast as loopback goes) with latency jitter drawn from `seed`, and with
    the faults `add`ed."""

    def __init__(
        self, upstream: str, link: Link | None = None, seed: int = 0, port: int = 0, record: bool = True
    ) -> None:
        self.upstream = upstream
        self._upstream = upstream_address(upstream)
        if not 0 <= port <= 65535:
            raise FeedrateError(f"port {port} is out of range; accepted: 0 (any free one) to 65535")
        try:
            self._listener = socket.create_server((HOST, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise FeedrateError(f"port {port} on {HOST} is in use; pick another or 0") from None
            raise
        self.endpoint = f"http://{HOST}:{self._listener.getsockname()[1]}"
        self.faults: list[Fault] = []
        self.log: list[LogEntry] = []
        self.record = record  # False: keep no request log (a long-running proxy, e.g. the CLI)
        self._lock = threading.Lock()
        self._link = link
        self._rng = random.Random(seed)
        self._agg_t = 0.0  # the shared bandwidth clock: when the proxy-wide link is free again
        self._peers: set[_Peer] = set()
        self._thread = threading.Thread(target=self._accept, name="netproxy", daemon=True)
        self._closed = False
        self._released = threading.Event()  # set on close: ends every stall and every pacing sleep

    @property
    def link(self) -> Link | None:
        """The shaping that requests arriving from now on get (in-flight ones keep theirs)."""
        with self._lock:
            return self._link

    @link.setter
    def link(self, link: Link | None) -> None:
        with self._lock:
            self._link = link
            self._agg_t = 0.0  # a new link starts idle: no backlog from the old one's figures

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def requests(self, method: str = "GET", path_contains: str = "") -> list[LogEntry]:
        """Logged requests with this method whose path contains `path_contains`, in arrival order."""
        with self._lock:
            return [e for e in self.log if e.method == method and path_contains in e.path]

    @property
    def injected(self) -> int:
        """Faults served so far (every fault's hits)."""
        with self._lock:
            return sum(f.hits for f in self.faults)

    def clear(self) -> None:
        """Forget the faults (served and pending): later requests are relayed untouched."""
        with self._lock:
            self.faults.clear()

    def start(self) -> NetProxy:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed = True
        self._released.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            peers = list(self._peers)
        for peer in peers:
            peer.close()
        if self._thread.ident is not None:  # a proxy that never started has no thread to wait for
            self._thread.join(timeout=5)

    def __enter__(self) -> NetProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- shaping -----------------------------------------------------------------------------------
    def _draw_latency(self, link: Link | None) -> float:
        """This request's first-byte latency: uniform in latency +- jitter, never negative."""
        if link is None or not link.latency_s:
            return 0.0
        if not link.jitter_s:
            return link.latency_s
        with self._lock:
            offset = self._rng.uniform(-link.jitter_s, link.jitter_s)
        return max(0.0, link.latency_s + offset)

    @staticmethod
    def _chunk_size(link: Link | None) -> int:
        rate = min(link.conn_bps, link.total_bps) if link is not None else math.inf
        if math.isinf(rate):
            return CHUNK
        return int(min(4 * CHUNK, max(MIN_SHAPED_CHUNK, rate * SHAPED_CHUNK_S)))

    def _reserve(self, clock: _ConnClock, link: Link, n: int, fresh: bool) -> float:
        """When a chunk of `n` bytes may be done: its transfer time booked on the connection's clock and
        on the shared one, each starting when that clock is free or now, whichever is later.

        `fresh` (a response's first chunk): now is now, so time a connection or the link spent idle
        earns no credit. Later chunks of a response follow their predecessor back to back, and "now"
        may trail the schedule by the proxy's own lateness (a sleep that overran, a thread that waited
        for a core): up to one chunk's transfer time or CATCH_UP_S, whichever is longer, the schedule
        stands and the chunk goes out at once, so lateness does not accumulate over a transfer.
        """
        now = time.monotonic()
        conn_dt, agg_dt = n / link.conn_bps, n / link.total_bps
        conn_t = max(now if fresh else now - max(conn_dt, CATCH_UP_S), clock.t) + conn_dt
        agg_t = 0.0
        if agg_dt:
            with self._lock:
                start = now if fresh else now - max(agg_dt, CATCH_UP_S)
                self._agg_t = max(start, self._agg_t) + agg_dt
                agg_t = self._agg_t
        clock.t = max(conn_t, agg_t)  # a connection held back by the shared link cannot catch up later
        return clock.t

    # -- internals ---------------------------------------------------------------------------------
    def _connect_upstream(self) -> _Peer:
        return self._track(_Peer(socket.create_connection(self._upstream, timeout=30)))

    def _track(self, peer: _Peer) -> _Peer:
        with self._lock:
            self._peers.add(peer)
        return peer

    def _untrack(self, peer: _Peer) -> None:
        with self._lock:
            self._peers.discard(peer)

    def _accept(self) -> None:
        self._listener.settimeout(0.1)  # a closed listener does not wake a blocked accept(): poll
        while not self._closed:
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            client = self._track(_Peer(sock))
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: _Peer) -> None:
        clock = _ConnClock()
        try:
            while True:
                raw = client.read_head()
                if raw is None:
                    return
                arrived = time.monotonic()
                request = Message.parse(raw)
                fault = self._claim(request)
                link = self.link
                link = link if link is not None and link.shaped else None
                entry = LogEntry(
                    request.method,
                    request.path,
                    request.headers.get("range"),
                    fault.name if fault else None,
                    arrived=arrived,
                    latency_s=self._draw_latency(link),
                )
                if self.record:
                    with self._lock:
                        self.log.append(entry)
                exchange = Exchange(self, client, request, link=link, clock=clock, entry=entry)
                keep = fault.serve(exchange) if fault else exchange.forward()
                if not keep or self._closed:
                    return
        except (OSError, ConnectionError, ValueError):
            return
        finally:
            client.close()
            self._untrack(client)

    def _claim(self, request: Message) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(request):
                    fault.hits += 1
                    return fault
        return None


# -- the command line --------------------------------------------------------------------------------
def _run(upstream: str, net: str, port: int, seed: int) -> None:
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    # Installed first: a TERM that comes right after the endpoint line still ends the proxy cleanly.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    link = preset(net)
    proxy = NetProxy(upstream, link=link, seed=seed, port=port, record=False)
    with proxy:
        print(f"endpoint {proxy.endpoint}", flush=True)
        while not stop.wait(0.5):
            pass


def main(argv: list[str] | None = None) -> None:
    """`python -m rig.netproxy`: a shaping proxy in the foreground until SIGTERM or SIGINT."""
    p = CliParser(
        prog="netproxy",
        description="Relay a local S3 endpoint through a shaped loopback link; prints 'endpoint URL'.",
    )
    p.add_argument("--upstream", required=True, help="the local endpoint, e.g. http://127.0.0.1:9000")
    p.add_argument(
        "--net", default="loopback", help=f"network preset: {', '.join(PRESETS)} (default: %(default)s)"
    )
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: 0, any free one)")
    p.add_argument("--seed", type=int, default=0, help="seed of the latency jitter (default: %(default)s)")

    def body() -> None:
        args = p.parse_args(argv)
        _run(args.upstream, args.net, args.port, args.seed)

    run_cli("netproxy", body)


if __name__ == "__main__":
    main()
