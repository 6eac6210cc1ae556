"""A loopback HTTP proxy that injects faults between an SDK client and a real server.

The S3 SDKs talk to `FaultProxy.endpoint`; the proxy relays each HTTP/1.1 exchange to the upstream
server (the moto process) and, for requests that a `Fault` matches, does something else instead:

- `Answer`: a status of its own instead of the server's (503 SlowDown by default);
- `Reset`: relay the response head and part of its body, then reset the connection (RST: bytes still
  in flight may be lost, as when a middlebox or a crashed server drops it);
- `Truncate`: the same with a plain close (FIN): the head promised a Content-Length, fewer bytes come;
- `Stall`: relay the head and part of the body (or nothing at all), then send nothing for longer than
  the client's read timeout, and drop the connection once the client has given up;
- `CutRequest`: read part of the request body (an upload), then reset the connection: the client's
  send breaks mid-body and the server never sees the request.

Every request is logged with the fault that hit it, so a test can check what the client did (how many
GETs, which Range it asked for on a resume), and `injected` counts the faults served.

Extending it: a fault is a small class with `serve(exchange) -> bool` (True: keep the client connection
for the next request). `Exchange` offers the building blocks: `forward(body_limit=..., pace=...)`
relays the request and the response, `reply(...)` answers without the upstream, `read_body(limit)` reads
the request body (answering `Expect: 100-continue` itself), `abort()` resets the connection.

Requests are relayed one upstream connection each; request bodies must carry a Content-Length (the
SDKs' reads, puts and part uploads do). The proxy listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pytest

HOST = "127.0.0.1"
CHUNK = 64 * 1024


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
    method: str
    path: str
    range: str | None
    fault: str | None


class Exchange:
    """One request from the client, with the means to answer it (relayed or not)."""

    def __init__(self, proxy: FaultProxy, client: _Peer, request: Message) -> None:
        self.proxy = proxy
        self.client = client
        self.request = request
        self.body: bytes | None = None  # read on demand: a fault may cut it short
        self.upstream: _Peer | None = None
        self._continued = False

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
        return data

    def wait(self, seconds: float) -> None:
        """Sleep `seconds`, or less when the proxy closes (a stalled test never outlives its proxy)."""
        self.proxy._released.wait(seconds)

    def reply(self, status: int, reason: str, body: bytes = b"", close: bool = False) -> bool:
        """Answer the client directly, as the server would; True when the connection stays open."""
        head = [
            f"HTTP/1.1 {status} {reason}",
            "Content-Type: application/xml",
            f"Content-Length: {len(body)}",
            f"Connection: {'close' if close else 'keep-alive'}",
        ]
        self.client.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
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
            self.client.sock.sendall(response.raw)
            sent = self._relay_body(upstream, response, body_limit, pace)
            if sent is None:
                if before_cut is not None:
                    before_cut()
                return self.abort(reset)
            keep = response.headers.get("connection", "").lower() != "close"
            return keep and not response.start.startswith("HTTP/1.0")
        finally:
            upstream.close()
            self.proxy._untrack(upstream)

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
        sent = 0
        while sent < length:
            if limit is not None and sent >= limit:
                return None
            if pace:
                pace(sent)
            want = length - sent if limit is None else min(length, limit) - sent
            data = upstream.read_some(want)
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
            f"<Message>injected by faultproxy</Message></Error>"
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


class FaultProxy:
    """Listen on a free loopback port and relay to `upstream` (an http:// endpoint), with faults."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or HOST, parts.port or 80)
        self._listener = socket.create_server((HOST, 0))
        self.endpoint = f"http://{HOST}:{self._listener.getsockname()[1]}"
        self.faults: list[Fault] = []
        self.log: list[LogEntry] = []
        self._lock = threading.Lock()
        self._peers: set[_Peer] = set()
        self._thread = threading.Thread(target=self._accept, name="faultproxy", daemon=True)
        self._closed = False
        self._released = threading.Event()  # set on close: ends every stall at once

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def requests(self, method: str = "GET", path_contains: str = "") -> list[LogEntry]:
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

    def start(self) -> FaultProxy:
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
        self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        try:
            while True:
                raw = client.read_head()
                if raw is None:
                    return
                request = Message.parse(raw)
                fault = self._claim(request)
                with self._lock:
                    entry = LogEntry(request.method, request.path, request.headers.get("range"), None)
                    entry.fault = fault.name if fault else None
                    self.log.append(entry)
                exchange = Exchange(self, client, request)
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


# -- the faults table (`make test-faults`) ----------------------------------------------------------
@dataclass
class Outcome:
    """What one fault-injection run came to."""

    path: str  # the part of the data path under test, e.g. "wds loader (s3)"
    fault: str  # Fault.label
    injected: int  # faults the proxy served
    result: str  # "survived" | "failed cleanly" | "unclean"
    lost: int  # samples missing, duplicated or foreign in what the run delivered
    retries: int  # retries the run's counters recorded


RESULTS = ("survived", "failed cleanly", "unclean")


@dataclass
class FaultTally:
    """Outcomes collected over a test session, printed as one table at its end (conftest.py)."""

    outcomes: list[Outcome] = field(default_factory=list)

    def add(self, outcome: Outcome) -> None:
        if outcome.result not in RESULTS:
            raise ValueError(f"unknown result {outcome.result!r}; accepted: {', '.join(RESULTS)}")
        self.outcomes.append(outcome)

    def table(self) -> str:
        head = (
            "path",
            "fault",
            "injected",
            "survived",
            "failed cleanly",
            "unclean",
            "samples lost",
            "retries",
        )
        rows: dict[tuple[str, str], list[int]] = {}
        for o in self.outcomes:
            row = rows.setdefault((o.path, o.fault), [0] * 6)
            row[0] += o.injected
            row[1 + RESULTS.index(o.result)] += 1
            row[4] += o.lost
            row[5] += o.retries
        total = [sum(r[i] for r in rows.values()) for i in range(6)]
        lines = [(*key, *map(str, row)) for key, row in rows.items()]
        lines.append(("total", "", *map(str, total)))
        widths = [max(len(str(x)) for x in col) for col in zip(head, *lines, strict=True)]

        def fmt(cells: tuple[str, ...]) -> str:
            left = [c.ljust(w) for c, w in zip(cells[:2], widths[:2], strict=True)]
            right = [c.rjust(w) for c, w in zip(cells[2:], widths[2:], strict=True)]
            return "  ".join(left + right)

        rule = "-" * len(fmt(head))
        return "\n".join([fmt(head), rule, *map(fmt, lines[:-1]), rule, fmt(lines[-1])])


TALLY_KEY = pytest.StashKey[FaultTally]()
