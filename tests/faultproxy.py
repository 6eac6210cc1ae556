"""A loopback HTTP proxy that injects faults between an SDK client and a real server.

The S3 SDKs talk to `FaultProxy.endpoint`; the proxy relays each HTTP/1.1 exchange to the upstream
server (the moto process) and, for requests that a `Fault` matches, does something else instead: answer
a status of its own (`Answer`, e.g. 503), or relay only part of the response body and then reset the
connection (`CutBody`). Every request is logged with the fault that hit it, so a test can check what
the client did (how many GETs, which Range it asked for on a resume).

Extending it: a fault is a small class with `serve(exchange) -> bool` (True: keep the client connection
for the next request). `Exchange` offers the building blocks: `forward(body_limit=..., pace=...)`
relays the request and the response, `reply(...)` answers without the upstream, `abort()` resets the
connection. A stall is `forward` with a `pace` that sleeps; a clean truncation is `forward` with a
`body_limit` and `reset=False`.

Requests are relayed one upstream connection each; request bodies must carry a Content-Length (reads
and simple puts do; the tests write their data straight to the server, not through the proxy).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

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

    def __init__(self, proxy: FaultProxy, client: _Peer, request: Message, body: bytes) -> None:
        self.proxy = proxy
        self.client = client
        self.request = request
        self.body = body
        self.upstream: _Peer | None = None

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
        self, body_limit: int | None = None, pace: Callable[[int], None] | None = None, reset: bool = True
    ) -> bool:
        """Relay the request upstream and the response back.

        `body_limit`: relay only that many response body bytes, then drop the client connection: with a
        reset (RST: the client may lose bytes it had not read yet) or, `reset=False`, a plain close
        (FIN: every relayed byte reaches the client, then the body ends early).
        `pace(n)`: called before each relayed body chunk with the bytes relayed so far (stalls).
        """
        upstream = self.proxy._connect_upstream()
        self.upstream = upstream
        try:
            upstream.sock.sendall(self.request.raw + self.body)
            raw = upstream.read_head()
            if raw is None:
                return self.abort()
            response = Message.parse(raw)
            self.client.sock.sendall(raw)
            sent = self._relay_body(upstream, response, body_limit, pace)
            if sent is None:
                return self.abort(reset)
            keep = response.headers.get("connection", "").lower() != "close"
            return keep and not response.start.startswith("HTTP/1.0")
        finally:
            upstream.close()
            self.proxy._untrack(upstream)

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

    def serve(self, exchange: Exchange) -> bool:
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

    def serve(self, exchange: Exchange) -> bool:
        return exchange.forward(body_limit=self.after_bytes, reset=self.reset)


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

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def requests(self, method: str = "GET", path_contains: str = "") -> list[LogEntry]:
        with self._lock:
            return [e for e in self.log if e.method == method and path_contains in e.path]

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed = True
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
                body = client.read_exact(int(request.headers.get("content-length", "0")))
                fault = self._claim(request)
                with self._lock:
                    entry = LogEntry(request.method, request.path, request.headers.get("range"), None)
                    entry.fault = fault.name if fault else None
                    self.log.append(entry)
                exchange = Exchange(self, client, request, body)
                keep = fault.serve(exchange) if fault else exchange.forward()
                if not keep:
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
