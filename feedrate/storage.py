"""Storage: one scheme table for every place a dataset can live.

shardgen writes through it and the loaders read through it, so `local path`, `file://`, `s3://` and
`cos://` mean the same thing everywhere. A `Store` is rooted at a URL (a directory or a bucket
prefix) and addresses objects by names relative to that root.

- local paths and `file://` URLs: plain files; writes go to a temporary name and are renamed into
  place, so a reader never sees half a file under its final name.
- `s3://bucket/prefix`: boto3 with its default credential chain; the endpoint comes from
  `--endpoint-url`, else boto3's own `AWS_ENDPOINT_URL`.
- `cos://bucket/prefix`: ibm_boto3 (IBM's fork of boto3). Credentials from IBM's documented
  sources: HMAC keys (`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` or `~/.bluemix/cos_credentials`)
  or an API key (`IBM_API_KEY_ID` + `IBM_SERVICE_INSTANCE_ID`, optional `IBM_AUTH_ENDPOINT`); an API
  key in the environment wins over an HMAC pair there, as in IBM's SDK. The endpoint comes from
  `--endpoint-url`, else `COS_ENDPOINT`, else the SDK's own `AWS_ENDPOINT_URL`.

The SDK packages are imported only when a remote store is opened. Every SDK error is turned into a
`StorageError` whose message names the URL and the cause and never carries a credential.

Reading an object survives a flaky network at two levels, both counted in `Counters.retries`:
- each request (any GET, PUT, part upload or HEAD) is retried by the SDK itself (its "standard" mode:
  5xx, throttling, connections refused, reset or timed out before the response, `MAX_ATTEMPTS` in all);
  the SDK's retries are counted from its own events, so uploads count them as much as reads;
- a body cut mid-way (a dropped connection, a truncated response, a read that stalls past the read
  timeout) is resumed from the byte reached with a ranged GET pinned to the object's ETag, with
  exponential backoff, at most `RetryPolicy.resumes` times per object. Past that budget the read fails
  with a StorageError naming the URL and the cause.
Whole-object downloads (`get_file`) use the same resumable read, one GET per object.

Timeouts: 5 s to connect, 60 s per socket read (`RetryPolicy.read_timeout_s`; the environment variable
`FEEDRATE_READ_TIMEOUT` overrides it, in seconds, for links where 60 s is too short or too long).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from feedrate.errors import FeedrateError
from feedrate.files import atomic_path, inside
from feedrate.network import MIN_TIMED_BODY

# Bounded network behaviour: an unreachable endpoint fails in seconds, not minutes.
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0
READ_TIMEOUT_ENV = "FEEDRATE_READ_TIMEOUT"
MAX_ATTEMPTS = 4  # per request, the first included
# Bytes per read from a response body: at most what a resume fetches again (when a reset connection
# drops bytes in flight). 128 KiB reads cost the S3 client ~1.4x the CPU of 1 MiB ones.
READ_CHUNK = 1024 * 1024
# Managed transfers: objects above this size go up and down in parallel multipart pieces.
MAX_CONNECTIONS = 48  # >= feedrate.network.MAX_FETCH_CONCURRENCY plus index readers
MULTIPART_THRESHOLD = 16 * 1024 * 1024
MULTIPART_CHUNKSIZE = 8 * 1024 * 1024  # the SDK's default part size
IAM_TOKEN_ENDPOINT = "https://iam.cloud.ibm.com/identity/token"  # ibm_botocore's default


class StorageError(FeedrateError):
    """A storage operation failed for a reason the user can act on (bucket, credentials, network)."""


class UnknownSchemeError(StorageError, ValueError):
    """A URL whose scheme is not in the scheme table."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often, and how patiently, a body cut mid-way is resumed.

    The defaults ride out a few dropped connections in a row (about 3 s of waiting in all) and still
    fail within seconds when the endpoint is really gone, rather than stalling an epoch for minutes.
    """

    resumes: int = 5  # ranged re-GETs per object read, after which the read fails
    base_delay_s: float = 0.1  # first wait; doubled on each further resume
    max_delay_s: float = 2.0
    read_timeout_s: float = READ_TIMEOUT_S  # a socket read that waits longer fails (and is retried)

    def __post_init__(self) -> None:
        if self.resumes < 0 or self.base_delay_s < 0 or self.max_delay_s < 0:
            raise StorageError(f"retry policy values must be >= 0, got {self}")
        if not self.read_timeout_s > 0:
            raise StorageError(f"retry policy read_timeout_s must be > 0, got {self.read_timeout_s}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> RetryPolicy:
        """The default policy, with the read timeout from `FEEDRATE_READ_TIMEOUT` (seconds) when set."""
        value = environ.get(READ_TIMEOUT_ENV, "").strip()
        if not value:
            return cls()
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if not (seconds > 0 and seconds < float("inf")):
            raise StorageError(f"{READ_TIMEOUT_ENV}={value!r}; accepted: a number of seconds > 0")
        return cls(read_timeout_s=seconds)

    def delay(self, attempt: int) -> float:
        """Seconds to wait before resume number `attempt` (0-based): full jitter, capped."""
        return random.uniform(0.5, 1.0) * min(self.max_delay_s, self.base_delay_s * (2**attempt))


@dataclass
class Counters:
    """What a store did, for run.json: bytes moved, requests made, and requests retried."""

    bytes_read: int = 0
    bytes_written: int = 0
    requests: int = 0
    retries: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, *, read: int = 0, written: int = 0, requests: int = 0, retries: int = 0) -> None:
        with self.lock:
            self.bytes_read += read
            self.bytes_written += written
            self.requests += requests
            self.retries += retries

    def as_dict(self) -> dict[str, int]:
        return {
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "requests": self.requests,
            "retries": self.retries,
        }


# Query parameters that carry a credential or a signature (pre-signed S3 URLs, tokens in endpoints).
_SECRET_QUERY = re.compile(
    r"([?&;](?:x-amz-signature|x-amz-credential|x-amz-security-token|signature|awsaccesskeyid|"
    r"x-goog-signature|x-goog-credential|sig|token|access_token|apikey|api_key|password|secret)=)[^&;#\s]*",
    re.IGNORECASE,
)
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)(.*)@", re.DOTALL)


def redact_url(url: object) -> str:
    """`url` safe to print: any user:password part and credential query values replaced by `***`.

    Works on the text, not on a parse: a secret may hold `/`, `#`, `?` or `@` (AWS secret keys often
    hold `/`), which a URL parser would take for the path or fragment and leave in place. Everything up
    to the last `@` after the scheme is treated as user info (over-redacting a path with an `@` is the
    safe mistake). Never raises, whatever it is given.
    """
    try:
        text = str(url)
        text = _USERINFO.sub(lambda m: f"{m.group(1)}***@", text, count=1)
        return _SECRET_QUERY.sub(lambda m: f"{m.group(1)}***", text)
    except Exception:  # a redactor that raises would print the raw value in its traceback
        return "<url hidden>"


class Store:
    """Objects under one root URL. Subclasses implement the primitive operations."""

    scheme = ""

    def __init__(self, url: str) -> None:
        self.url = redact_url(url.rstrip("/"))  # what messages, manifests and run.json show
        self.counters = Counters()
        # (seconds to first byte, body bytes, seconds reading the body, monotonic time of the first and
        # of the last body byte) of recent remote GETs: what a loader sizes its prefetching by when it
        # is not told the link (feedrate.network.measured)
        self.timings: deque[tuple[float, int, float, float, float]] = deque(maxlen=64)
        self.peak_body_bps = 0.0  # the fastest timed body of network.MIN_TIMED_BODY bytes or more, ever

    # -- naming ----------------------------------------------------------------------------------
    def url_for(self, name: str) -> str:
        """The full URL of `name`, for messages and manifests."""
        return f"{self.url}/{name}"

    @property
    def is_local(self) -> bool:
        return False

    # -- primitives --------------------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def size(self, name: str) -> int:
        raise NotImplementedError

    def open_read(self, name: str, start: int = 0, end: int | None = None) -> BinaryIO:
        """A streaming reader of `name` from byte `start` to `end` (exclusive; None: the end).

        One request for a remote object (a ranged GET unless it is the whole object), resumed from the
        byte reached when the connection drops mid-body.
        """
        raise NotImplementedError

    def read_bytes(self, name: str) -> bytes:
        with self.open_read(name) as stream:
            return stream.read()

    def write_bytes(self, name: str, data: bytes) -> None:
        """Store `data` under `name`, all or nothing."""
        raise NotImplementedError

    def put_file(
        self, local_path: str | Path, name: str, callback: Callable[[int], Any] | None = None
    ) -> None:
        """Copy a local file to `name` (a managed, possibly multipart, transfer for remote stores)."""
        raise NotImplementedError

    def get_file(
        self, name: str, local_path: str | Path, callback: Callable[[int], Any] | None = None
    ) -> None:
        """Copy `name` to a local file, written under a temporary name and renamed into place."""
        raise NotImplementedError

    def delete(self, name: str) -> None:
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[str]:
        """Names under the root that start with `prefix`, sorted."""
        raise NotImplementedError

    def check_writable(self) -> None:
        """Raise StorageError unless objects can be written under the root."""
        raise NotImplementedError

    def check_readable(self) -> None:
        """Raise StorageError unless the root can be read (bucket exists, credentials work)."""
        raise NotImplementedError


class LocalStore(Store):
    """A directory on local disk."""

    scheme = "file"

    def __init__(self, url: str) -> None:
        path = url
        if url.startswith("file://"):
            host, slash, rest = url[len("file://") :].partition("/")
            if host not in ("", "localhost"):
                raise StorageError(
                    f"{redact_url(url)!r} names host {host!r}; expected file:///ABSOLUTE/PATH or a local path"
                )
            path = slash + rest
        if not path:
            raise StorageError(f"empty path in {url!r}; expected a directory such as data/shards")
        self.root = Path(path).expanduser()
        super().__init__(str(self.root))

    @property
    def is_local(self) -> bool:
        return True

    def path(self, name: str) -> Path:
        """The file for `name`, which must stay inside the root (names can come from a manifest)."""
        try:
            return inside(self.root, name)
        except ValueError as exc:
            raise StorageError(str(exc)) from None

    def url_for(self, name: str) -> str:
        return str(self.path(name))

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def size(self, name: str) -> int:
        try:
            return self.path(name).stat().st_size
        except FileNotFoundError:
            raise StorageError(f"{self.path(name)} does not exist") from None

    def open_read(self, name: str, start: int = 0, end: int | None = None) -> BinaryIO:
        try:
            stream = open(self.path(name), "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError:
            raise StorageError(f"{self.path(name)} does not exist") from None
        except OSError as exc:
            raise StorageError(f"cannot read {self.path(name)}: {exc.strerror}") from None
        if start:
            stream.seek(start)
        self.counters.add(requests=1)
        limit = None if end is None else max(0, end - start)
        return _CountingReader(stream, self.counters, limit)  # type: ignore[return-value]

    @contextlib.contextmanager
    def _atomic_target(self, name: str) -> Iterator[Path]:
        """`files.atomic_path` for `name`, with OS errors (a full disk, a quota) as StorageErrors."""
        target = self.path(name)
        try:
            with atomic_path(target) as tmp:
                yield tmp
        except OSError as exc:  # a full disk, a quota, a file size limit: the user's to fix
            raise StorageError(f"cannot write {target}: {exc.strerror or exc}") from None

    def write_bytes(self, name: str, data: bytes) -> None:
        with self._atomic_target(name) as tmp:
            tmp.write_bytes(data)
        self.counters.add(written=len(data), requests=1)

    def put_file(
        self, local_path: str | Path, name: str, callback: Callable[[int], Any] | None = None
    ) -> None:
        local_path = Path(local_path)
        size = local_path.stat().st_size
        with self._atomic_target(name) as tmp:
            shutil.copyfile(local_path, tmp)
        self.counters.add(written=size, requests=1)
        if callback:
            callback(size)

    def get_file(
        self, name: str, local_path: str | Path, callback: Callable[[int], Any] | None = None
    ) -> None:
        source = self.path(name)
        if not source.is_file():
            raise StorageError(f"{source} does not exist")
        local = LocalStore(str(Path(local_path).parent))
        with local._atomic_target(Path(local_path).name) as tmp:
            shutil.copyfile(source, tmp)
        size = source.stat().st_size
        self.counters.add(read=size, requests=1)
        if callback:
            callback(size)

    def delete(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)

    def list(self, prefix: str = "") -> list[str]:
        if not self.root.is_dir():
            return []
        names = []
        for path in self.root.rglob("*"):
            if path.is_file():
                rel = path.relative_to(self.root).as_posix()
                if rel.startswith(prefix):
                    names.append(rel)
        return sorted(names)

    def check_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".write-check."):
                pass
        except OSError as exc:
            raise StorageError(f"destination {self.root} is not writable: {exc.strerror or exc}") from None

    def check_readable(self) -> None:
        if not self.root.is_dir():
            raise StorageError(f"{self.root} does not exist or is not a directory")


class _CountingReader:
    """Wraps a binary stream, counts the bytes read through it and stops after `limit` bytes."""

    def __init__(self, stream: Any, counters: Counters, limit: int | None = None) -> None:
        self._stream = stream
        self._counters = counters
        self._left = limit

    def read(self, size: int | None = -1) -> bytes:
        if self._left is not None:
            size = self._left if size is None or size < 0 else min(size, self._left)
        data = self._stream.read(size)
        if self._left is not None:
            self._left -= len(data)
        self._counters.add(read=len(data))
        return data

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._left is not None:
            view = view[: self._left]
        n = self._stream.readinto(view) or 0
        if self._left is not None:
            self._left -= n
        self._counters.add(read=n)
        return n

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        """The file's descriptor (a local file: its stat is read through it, loaders.shards)."""
        return int(self._stream.fileno())

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> _CountingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _ResumableBody:
    """The body of one object GET that survives a dropped connection.

    It knows how many bytes to expect (from the response's Content-Length), so a body that ends early is
    as much a failure as one that raises. On either, it waits (`RetryPolicy.delay`) and reopens with a
    ranged GET from the byte reached, pinned to the first response's ETag, until `RetryPolicy.resumes`
    is spent; then it raises a StorageError naming the object URL, the byte reached and the cause.
    """

    def __init__(self, store: ObjectStore, name: str, start: int, end: int | None) -> None:
        self._store = store
        self._name = name
        self._pos = start
        self._end = end
        self._resumes = 0
        self._transient = store._transient_errors()
        t0 = time.perf_counter()
        response = store._get(name, start, end, None)
        self._first_byte_at = self._last_byte_at = time.perf_counter()
        self._first_byte_s = self._first_byte_at - t0
        self._body_s = 0.0
        self._got = 0
        self._timed = False
        self._etag: str | None = response.get("ETag")
        if self._end is None:
            self._end = start + int(response["ContentLength"])
        self._body = response["Body"]

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            chunks = []
            while chunk := self.read(1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)
        return self._pull(size, b"", lambda want: self._body.read(want))  # type: ignore[return-value]

    def readinto(self, buffer: Any) -> int:
        """Read straight into `buffer` when the SDK's stream allows (urllib3's response under
        botocore's StreamingBody): a shard then crosses from the socket to its buffer in one copy, which
        took the client's CPU per MB from 1.2 to 0.8 ms here (at 30k img/s of raw 32x32 samples a 2-core
        box reads ~130 MB/s)."""
        view = memoryview(buffer).cast("B")
        if not hasattr(getattr(self._body, "_raw_stream", None), "readinto"):
            data = self.read(len(view))
            view[: len(data)] = data
            return len(data)
        # the body's stream is looked up at each step: a resume replaces the body
        return self._pull(len(view), 0, lambda want: self._body._raw_stream.readinto(view[:want]))  # type: ignore[return-value]

    def _pull(self, size: int, empty: bytes | int, step: Callable[[int], bytes | int]) -> bytes | int:
        """One bounded read by `step(want)` (bytes, or a count read into a buffer), resumed while the
        connection breaks or ends early; `empty` at the end of the range."""
        while True:
            # Bounded reads: an SDK read that breaks loses what it buffered, so at most one chunk is
            # fetched again on a resume.
            want = min(size, self._end - self._pos, READ_CHUNK)  # type: ignore[operator]
            if want <= 0:
                return empty
            t0 = time.perf_counter()
            try:
                got = step(want)
            except self._transient as exc:
                self._resume(exc)
                continue
            n = got if isinstance(got, int) else len(got)
            if not n:
                self._resume(None)
                continue
            self._last_byte_at = time.perf_counter()
            self._body_s += self._last_byte_at - t0
            self._got += n
            self._pos += n
            self._store.counters.add(read=n)
            return got

    def _resume(self, cause: BaseException | None) -> None:
        url = self._store.url_for(self._name)
        why = _describe(cause) if cause else "the connection closed early"
        policy = self._store.retry
        if self._resumes >= policy.resumes:
            raise StorageError(
                f"{url}: connection lost at byte {self._pos} of {self._end} ({why}); gave up after "
                f"{self._resumes} resumed GET(s)"
            )
        self._close_body()
        time.sleep(policy.delay(self._resumes))
        self._resumes += 1
        self._store.counters.add(retries=1)
        self._body = self._store._get(self._name, self._pos, self._end, self._etag)["Body"]

    def _close_body(self) -> None:
        with contextlib.suppress(Exception):
            self._body.close()

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._close_body()
        if not self._timed and self._got and not self._resumes:  # a resumed GET times the fault, not the link
            self._timed = True
            self._store.timings.append(
                (self._first_byte_s, self._got, self._body_s, self._first_byte_at, self._last_byte_at)
            )
            if self._got >= MIN_TIMED_BODY and self._body_s > 0:
                self._store.peak_body_bps = max(self._store.peak_body_bps, self._got / self._body_s)

    def __enter__(self) -> _ResumableBody:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def _check_range(response: dict[str, Any], start: int, end: int | None, url: str) -> None:
    """Raise StorageError unless a ranged GET's answer is the range asked for.

    HTTP lets a server ignore `Range` and answer 200 with the whole object; spliced in at a resume
    offset those bytes would be silently wrong data.
    """
    found = _CONTENT_RANGE.fullmatch(str(response.get("ContentRange") or ""))
    first = int(found.group(1)) if found else None
    last = int(found.group(2)) if found else None
    total = found.group(3) if found else None
    short_at_end = last is not None and total not in (None, "*") and last == int(total) - 1  # end past EOF
    if found is None or first != start or (end is not None and last != end - 1 and not short_at_end):
        with contextlib.suppress(Exception):
            response["Body"].close()
        wanted = f"bytes {start}-{'' if end is None else end - 1}"
        raise StorageError(
            f"{url}: asked for {wanted}, the server answered Content-Range "
            f"{response.get('ContentRange')!r} (a server or gateway that ignores Range)"
        )


def _describe(exc: BaseException) -> str:
    """A one-line cause for a message: the exception and its root cause (e.g. a connection reset)."""
    root = _root_cause(exc)
    if root is exc:
        text = " ".join(str(exc).split())[:120]
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    text = " ".join(str(root).split())[:120]
    return f"{type(exc).__name__} ({type(root).__name__}: {text})"


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost error behind SDK wrappers (botocore's `error=` kwarg, urllib3's args, chaining)."""
    seen = {id(exc)}
    while True:
        inner = (
            getattr(exc, "kwargs", {}).get("error")
            if isinstance(getattr(exc, "kwargs", None), dict)
            else None
        )
        inner = inner or next((a for a in exc.args if isinstance(a, BaseException)), None)
        inner = inner or exc.__cause__ or exc.__context__
        if inner is None or id(inner) in seen:
            return exc
        seen.add(id(inner))
        exc = inner


class ObjectStore(Store):
    """A bucket prefix behind an S3-compatible API; subclasses supply the SDK."""

    sdk_hint = ""

    def __init__(self, url: str, endpoint_url: str | None = None, retry: RetryPolicy | None = None) -> None:
        super().__init__(url)
        self.retry = retry or RetryPolicy.from_env(os.environ)
        parts = urlsplit(url)
        if parts.query or parts.fragment or "?" in url or "#" in url:
            raise StorageError(
                f"{redact_url(url)!r} has a query or fragment ('?' or '#'), which object keys here never "
                f"carry; expected {self.scheme}://BUCKET[/PREFIX]"
            )
        self.bucket = parts.netloc
        if not self.bucket:
            raise StorageError(f"no bucket in {url!r}; expected {self.scheme}://BUCKET[/PREFIX]")
        self.prefix = parts.path.strip("/")
        self.endpoint_url = endpoint_url or self._default_endpoint()
        self._client: Any = None
        self._client_lock = threading.Lock()

    # -- SDK specifics -------------------------------------------------------------------------------
    def _default_endpoint(self) -> str | None:
        return None

    def _sdk(self) -> tuple[Any, Any, Any]:
        """(sdk module, its Config class, its exceptions module)."""
        raise NotImplementedError

    def _client_kwargs(self) -> dict[str, Any]:
        return {}

    def _transfer_config(self) -> Any:
        raise NotImplementedError

    # -- client --------------------------------------------------------------------------------------
    @property
    def client(self) -> Any:
        with self._client_lock:
            if self._client is None:
                sdk, config_cls, _ = self._sdk()
                config = config_cls(
                    connect_timeout=CONNECT_TIMEOUT_S,
                    read_timeout=self.retry.read_timeout_s,
                    retries={"total_max_attempts": MAX_ATTEMPTS, "mode": "standard"},  # attempts, not retries
                    # one pooled connection per concurrent GET a loader may plan (feedrate.network)
                    max_pool_connections=MAX_CONNECTIONS,
                    **self._extra_config(),
                )
                kwargs = self._client_kwargs()
                if self.endpoint_url:
                    kwargs["endpoint_url"] = self.endpoint_url
                try:
                    client = sdk.client("s3", config=config, **kwargs)
                except Exception as exc:
                    raise self._translate(exc, self.url) from None
                # Every attempt of every request (managed transfers' parts included) is created anew;
                # the SDK numbers them, so attempts after the first are the SDK's retries.
                client.meta.events.register("request-created.s3", self._count_retry)
                self._client = client
            return self._client

    def _count_retry(self, request: Any = None, **_: Any) -> None:
        attempt = getattr(request, "context", {}).get("retries", {}).get("attempt", 1)
        if attempt > 1:
            self.counters.add(retries=1)

    def _extra_config(self) -> dict[str, Any]:
        return {}

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def where(self) -> str:
        endpoint = self.endpoint_url
        if not endpoint and self._client is not None:
            endpoint = self._client.meta.endpoint_url
        return f" at {redact_url(endpoint)}" if endpoint else ""

    def _translate(self, exc: Exception, url: str) -> StorageError:
        """An SDK exception as a one-line StorageError naming `url`, free of secrets."""
        _, _, errors = self._sdk()
        where = self.where()
        if isinstance(exc, StorageError):
            return exc
        inner = exc.__cause__ or exc.__context__
        if type(exc).__name__ == "S3UploadFailedError" and isinstance(inner, Exception):
            return self._translate(inner, url)  # the managed upload's wrapper: the SDK error inside says why
        if isinstance(exc, errors.NoCredentialsError):
            return StorageError(f"no credentials for {url}: {self.sdk_hint}")
        if isinstance(exc, (errors.EndpointConnectionError, errors.ConnectTimeoutError)):
            return StorageError(f"cannot reach the endpoint for {url}{where}")
        if isinstance(exc, errors.ReadTimeoutError):
            return StorageError(f"timed out reading {url}{where}")
        if isinstance(exc, errors.ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchBucket",) or (code == "404" and not self._key_in(url)):
                return StorageError(f"bucket {self.bucket!r} does not exist{where} ({url})")
            if code in ("NoSuchKey", "404", "NotFound"):
                return StorageError(f"{url} does not exist")
            if code in (
                "InvalidAccessKeyId",
                "SignatureDoesNotMatch",
                "AccessDenied",
                "403",
                "Forbidden",
                "InvalidToken",
            ):
                return StorageError(
                    f"access denied to {url}{where} (code {code}): check the credentials; {self.sdk_hint}"
                )
            attempts = int(exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0)) + 1
            tried = f" (HTTP {status}, {attempts} attempts)" if attempts > 1 else ""
            return StorageError(f"{url}: {code or status} {error.get('Message', '')}".strip() + tried)
        if isinstance(exc, errors.BotoCoreError):
            return StorageError(f"{url}: {type(exc).__name__}{where}")
        return StorageError(f"{url}: {type(exc).__name__}")

    def _key_in(self, url: str) -> bool:
        return url.rstrip("/") != f"{self.scheme}://{self.bucket}"

    def _call(self, url: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            result = fn(**kwargs)
        except Exception as exc:
            raise self._translate(exc, url) from None
        self.counters.add(requests=1)
        return result

    # -- operations ----------------------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        url = self.url_for(name)
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(name))
        except Exception as exc:
            _, _, errors = self._sdk()
            if isinstance(exc, errors.ClientError):
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code in ("404", "NoSuchKey", "NotFound"):
                    self.counters.add(requests=1)
                    self.check_readable()
                    return False
            raise self._translate(exc, url) from None
        self.counters.add(requests=1)
        return True

    def size(self, name: str) -> int:
        head = self._call(self.url_for(name), self.client.head_object, Bucket=self.bucket, Key=self.key(name))
        return int(head["ContentLength"])

    def open_read(self, name: str, start: int = 0, end: int | None = None) -> BinaryIO:
        return _ResumableBody(self, name, start, end)  # type: ignore[return-value]

    def _get(self, name: str, start: int, end: int | None, etag: str | None) -> dict[str, Any]:
        """One GET of `name` from `start` to `end` (exclusive); the SDK's request retries are counted
        by `_count_retry`."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key(name)}
        if start or end is not None:
            kwargs["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        if etag:
            kwargs["IfMatch"] = etag  # a resume must read the same object version, or fail
        url = self.url_for(name)
        response = self._call(url, self.client.get_object, **kwargs)
        if "Range" in kwargs:
            _check_range(response, start, end, url)
        if etag and response.get("ETag") != etag:
            with contextlib.suppress(Exception):
                response["Body"].close()
            raise StorageError(
                f"{url}: changed while it was read (ETag {response.get('ETag')!r}, expected {etag!r})"
            )
        return response

    def _transient_errors(self) -> tuple[type[BaseException], ...]:
        """Exceptions that mean "the connection broke while the body was streaming"."""
        import urllib3.exceptions

        _, _, errors = self._sdk()
        names = ("ResponseStreamingError", "IncompleteReadError", "ReadTimeoutError", "ConnectionClosedError")
        found = tuple(getattr(errors, n) for n in names if hasattr(errors, n))
        return (*found, urllib3.exceptions.HTTPError, OSError)

    def write_bytes(self, name: str, data: bytes) -> None:
        self._call(
            self.url_for(name),
            self.client.put_object,
            Bucket=self.bucket,
            Key=self.key(name),
            Body=data,
        )
        self.counters.add(written=len(data))

    def put_file(
        self, local_path: str | Path, name: str, callback: Callable[[int], Any] | None = None
    ) -> None:
        size = Path(local_path).stat().st_size
        # upload_file is the SDK's managed transfer: multipart above the threshold, retried parts,
        # and an aborted multipart upload when it fails or is interrupted.
        try:
            self._call(
                self.url_for(name),
                self.client.upload_file,
                Filename=str(local_path),
                Bucket=self.bucket,
                Key=self.key(name),
                Config=self._transfer_config(),
                Callback=callback,
            )
        finally:
            if size >= MULTIPART_THRESHOLD:
                self._abort_open_uploads(name)
        self.counters.add(written=size)

    def _abort_open_uploads(self, name: str) -> None:
        """Abort multipart uploads of `name` still open after its upload finished, failed or was stopped.

        The SDK aborts the upload it knows of, but not one it lost: when the answer to "start a
        multipart upload" is cut off, the SDK retries and starts a second one, and the first stays open
        on the server, invisible and billed, until a lifecycle rule removes it. Best effort (the
        object's own error, if any, is the one that matters); every writer of a dataset key is this
        process, so an open upload of the key is one of ours.
        """
        key = self.key(name)
        with contextlib.suppress(Exception):
            listing = self._call(
                self.url_for(name), self.client.list_multipart_uploads, Bucket=self.bucket, Prefix=key
            )
            for upload in listing.get("Uploads", []):
                if upload.get("Key") == key:
                    self._call(
                        self.url_for(name),
                        self.client.abort_multipart_upload,
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload["UploadId"],
                    )

    def get_file(
        self, name: str, local_path: str | Path, callback: Callable[[int], Any] | None = None
    ) -> None:
        """One GET streamed to a temporary file, resumed from the byte reached if the connection drops
        (pinned to the object's ETag, counted in `retries`), then renamed into place.

        Not the SDK's managed download: it restarts a broken part from the part's start, with a retry
        loop of its own that cannot be counted. The files read here (shards, index files, CIFAR
        batches) are at most a few tens of MB, for which one stream is as fast as parallel parts.
        """
        local_path = Path(local_path)
        target = LocalStore(str(local_path.parent))
        with (
            target._atomic_target(local_path.name) as tmp,
            self.open_read(name) as stream,
            open(tmp, "wb") as f,
        ):
            while chunk := stream.read(READ_CHUNK):
                f.write(chunk)
                if callback:
                    callback(len(chunk))

    def delete(self, name: str) -> None:
        self._call(self.url_for(name), self.client.delete_object, Bucket=self.bucket, Key=self.key(name))

    def list(self, prefix: str = "") -> list[str]:
        root = f"{self.prefix}/" if self.prefix else ""
        names: list[str] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": root + prefix}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call(self.url, self.client.list_objects_v2, **kwargs)
            names.extend(obj["Key"][len(root) :] for obj in page.get("Contents", []))
            if not page.get("IsTruncated"):
                break
            token = page.get("NextContinuationToken")
        return sorted(names)

    def check_readable(self) -> None:
        self._call(f"{self.scheme}://{self.bucket}", self.client.head_bucket, Bucket=self.bucket)

    def check_writable(self) -> None:
        # HEAD on the bucket proves it exists and the credentials are accepted; a write that is then
        # refused still fails with a StorageError naming the object.
        self.check_readable()


class S3Store(ObjectStore):
    """`s3://bucket/prefix` through boto3."""

    scheme = "s3"
    sdk_hint = (
        "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or another source of "
        "boto3's default credential chain"
    )

    def _sdk(self) -> tuple[Any, Any, Any]:
        try:
            import boto3
            import botocore.config
            import botocore.exceptions
        except ImportError:
            raise StorageError("s3:// needs boto3: pip install boto3") from None
        return boto3, botocore.config.Config, botocore.exceptions

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD,
            multipart_chunksize=MULTIPART_CHUNKSIZE,
            max_concurrency=4,
        )


class COSStore(ObjectStore):
    """`cos://bucket/prefix` through ibm_boto3 (IBM Cloud Object Storage)."""

    scheme = "cos"
    sdk_hint = (
        "set HMAC keys (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or ~/.bluemix/cos_credentials) "
        "or IBM_API_KEY_ID with IBM_SERVICE_INSTANCE_ID"
    )

    def _default_endpoint(self) -> str | None:
        return os.environ.get("COS_ENDPOINT") or None

    def _sdk(self) -> tuple[Any, Any, Any]:
        try:
            import ibm_boto3
            import ibm_botocore.config
            import ibm_botocore.exceptions
        except ImportError:
            raise StorageError("cos:// needs ibm-cos-sdk: pip install ibm-cos-sdk") from None
        return ibm_boto3, ibm_botocore.config.Config, ibm_botocore.exceptions

    def _extra_config(self) -> dict[str, Any]:
        # With an API key COS authenticates by IAM token: the "oauth" signer. ibm_botocore's credential
        # chain takes IBM_API_KEY_ID before an HMAC pair in the environment, so the signer follows it
        # (an HMAC signer over token credentials fails whichever way the request goes).
        if os.environ.get("IBM_API_KEY_ID"):
            return {"signature_version": "oauth"}
        return {}

    def _translate(self, exc: Exception, url: str) -> StorageError:
        """As ObjectStore's, plus a failed IAM token request (API key authentication), which the SDK
        raises from `requests` or as a credential retrieval error: named with the token endpoint and
        the HTTP status at most (the IAM server's own text is not repeated)."""
        _, _, errors = self._sdk()
        from_requests = type(exc).__module__.split(".")[0] == "requests"
        if from_requests or isinstance(exc, errors.CredentialRetrievalError):
            status = re.search(r"HttpCode\((\d+)\)", str(exc))
            cause = f"HTTP {status.group(1)}" if status else type(exc).__name__
            endpoint = redact_url(os.environ.get("IBM_AUTH_ENDPOINT") or IAM_TOKEN_ENDPOINT)
            return StorageError(
                f"cannot get an IAM token for {url} from {endpoint} ({cause}): check IBM_API_KEY_ID, "
                "IBM_SERVICE_INSTANCE_ID and IBM_AUTH_ENDPOINT"
            )
        return super()._translate(exc, url)

    def _transfer_config(self) -> Any:
        from ibm_boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD,
            multipart_chunksize=MULTIPART_CHUNKSIZE,
            max_concurrency=4,
        )


# The scheme table: every URL feedrate accepts resolves here, and nowhere else.
SCHEMES: dict[str, type[Store]] = {
    "file": LocalStore,
    "s3": S3Store,
    "cos": COSStore,
}


def scheme_of(url: str) -> str:
    """The storage scheme of `url`: a bare path counts as `file`."""
    if "://" not in url:
        return "file"
    return url.split("://", 1)[0].lower()


def open_store(url: str, endpoint_url: str | None = None, retry: RetryPolicy | None = None) -> Store:
    """The Store rooted at `url`; an unknown scheme is a StorageError naming the accepted ones.

    `retry` bounds how a remote read resumes a dropped body (local stores need none).
    """
    if not url or not url.strip():
        raise StorageError("empty storage URL; expected a local path, file://, s3:// or cos:// URL")
    scheme = scheme_of(url)
    cls = SCHEMES.get(scheme)
    if cls is None:
        accepted = ", ".join(f"{s}://" for s in SCHEMES)
        raise UnknownSchemeError(
            f"unknown storage scheme {scheme!r} in {redact_url(url)!r}; accepted: a local path, {accepted}"
        )
    if issubclass(cls, ObjectStore):
        return cls(url, endpoint_url=endpoint_url, retry=retry)
    return cls(url)
