"""The local S3 endpoint as its users need it: moto's server with a bucket, optionally behind the shaping
proxy, and the environment that points the SDKs at whichever of the two is in front.

`make bench`, `make compare` and `make s3-up` all start it here (`start_endpoint`, or `local_endpoint` as
a context manager), so that the three agree on what "the local endpoint" is: the same bucket creation,
the same log files, the same credentials. The proxy runs either as threads of the calling process
(`proxy="thread"`: the bench and compare re-shape it between runs through `LocalEndpoint.proxy.link`) or
as a process of its own (`proxy="process"`: `make s3-up` returns while it keeps serving).

The environment it hands out carries the rig's placeholder keys, never the caller's: a user's real
access keys, session token or profile must not sign requests to a local test server (nor be written to
its log), so those variables are removed (`CALLER_CREDENTIALS`), not merely shadowed.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from feedrate.errors import FeedrateError
from rig import locals3

if TYPE_CHECKING:
    from rig.netproxy import NetProxy

ProxyMode = Literal["", "thread", "process"]
PROXY_MODES: tuple[str, ...] = ("", "thread", "process")
# Variables that would make an SDK sign with the caller's own identity (a session token goes with
# whichever keys are set; a profile or an IBM API key is preferred over the keys by some SDK chains).
CALLER_CREDENTIALS = (
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "IBM_API_KEY_ID",
    "IBM_SERVICE_INSTANCE_ID",
    "IBM_AUTH_ENDPOINT",
)


@dataclass
class LocalEndpoint:
    """A running local server (and proxy): what to point the SDKs at, and how to stop it all."""

    server: locals3.LocalS3
    bucket: str
    proxy: NetProxy | None = None  # in this process: its `link` may be changed between runs
    proxy_pid: int | None = None  # a process of its own
    proxy_endpoint: str = ""

    @property
    def endpoint(self) -> str:
        """The URL the SDKs talk to: the proxy when there is one, else the server."""
        return self.proxy_endpoint or self.server.endpoint

    def env(self, direct: bool = False) -> dict[str, str]:
        """The variables to set: endpoint (the server itself with `direct`), placeholder keys, region, and
        no instance-metadata lookups. `CALLER_CREDENTIALS` are to be unset beside them."""
        endpoint = self.server.endpoint if direct else self.endpoint
        return {
            **self.server.env(),
            "AWS_ENDPOINT_URL": endpoint,
            "COS_ENDPOINT": endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def environ(self, base: Mapping[str, str] | None = None, direct: bool = False) -> dict[str, str]:
        """`base` (default: this process's environment) pointed at this endpoint, without the caller's
        own credentials: the environment for a subprocess that reads or writes the local bucket."""
        source = os.environ if base is None else base
        kept = {k: v for k, v in source.items() if k not in CALLER_CREDENTIALS}
        return kept | self.env(direct)

    @contextlib.contextmanager
    def direct(self) -> Iterator[None]:
        """This process's environment pointed straight at the server (not the proxy) for the block, then
        restored: set-up uploads in this process, unshaped and unmeasured."""
        saved = dict(os.environ)
        try:
            os.environ.clear()
            os.environ.update(self.environ(saved, direct=True))
            yield
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def pids(self) -> list[int]:
        """The processes that serve requests (the server; the proxy's process, or this one for a proxy
        in threads): whose CPU time is the emulated endpoint's."""
        pids = [self.server.pid]
        if self.proxy_pid is not None:
            pids.append(self.proxy_pid)
        elif self.proxy is not None:
            pids.append(os.getpid())
        return pids

    def close(self) -> None:
        """Stop the proxy, then the server."""
        try:
            if self.proxy is not None:
                self.proxy.close()
            if self.proxy_pid is not None:
                locals3.stop(self.proxy_pid)
        finally:
            locals3.stop(self.server.pid)


def start_endpoint(
    bucket: str, log_dir: Path | None = None, proxy: ProxyMode = "", net: str = "loopback"
) -> LocalEndpoint:
    """Start the server on 127.0.0.1, create `bucket`, and with `proxy` put the shaping proxy (preset
    `net`) in front. Logs go to `log_dir` (moto.log, proxy.log) when given. Whatever started is stopped
    again if a later step fails."""
    from feedrate.network import preset

    if proxy not in PROXY_MODES:
        raise FeedrateError(f"unknown proxy mode {proxy!r}; accepted: {', '.join(map(repr, PROXY_MODES))}")
    link = preset(net)  # an unknown name fails before anything starts, naming the accepted ones
    server = locals3.start(log_path=log_dir / "moto.log" if log_dir else None)
    endpoint = LocalEndpoint(server, bucket)
    try:
        locals3.create_bucket(server.endpoint, bucket)
        if proxy == "thread":
            from rig.netproxy import NetProxy

            shaping = None if link.name == "loopback" else link  # None: relayed as fast as loopback goes
            endpoint.proxy = NetProxy(server.endpoint, link=shaping, seed=0, record=False).start()
            endpoint.proxy_endpoint = endpoint.proxy.endpoint
        elif proxy == "process":
            log = log_dir / "proxy.log" if log_dir else None
            endpoint.proxy_pid, endpoint.proxy_endpoint = start_proxy(server.endpoint, net, log)
    except BaseException:
        endpoint.close()
        raise
    return endpoint


@contextlib.contextmanager
def local_endpoint(
    bucket: str, log_dir: Path | None = None, proxy: ProxyMode = "", net: str = "loopback"
) -> Iterator[LocalEndpoint]:
    """`start_endpoint` for the length of a block: stopped however the block ends."""
    endpoint = start_endpoint(bucket, log_dir, proxy, net)
    try:
        yield endpoint
    finally:
        endpoint.close()


def start_proxy(
    upstream: str, net: str, log_path: Path | None = None, timeout_s: float = 30.0
) -> tuple[int, str]:
    """The shaping proxy for preset `net` in front of `upstream`, as its own process: (pid, endpoint)."""
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "rig.netproxy", "--upstream", upstream, "--net", net],
        stdout=subprocess.PIPE,
        stderr=log,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # outlives `make s3-up`; stopped by pid
    )
    assert proc.stdout is not None  # stdout=PIPE
    deadline = time.monotonic() + timeout_s
    line = ""
    while time.monotonic() < deadline and not line:
        line = proc.stdout.readline().strip()
        if not line and proc.poll() is not None:
            raise FeedrateError(f"the shaping proxy exited with code {proc.returncode}")
    proc.stdout.close()
    if not line.startswith("endpoint "):
        locals3.stop(proc.pid)
        raise FeedrateError(f"the shaping proxy did not report its endpoint within {timeout_s:.0f} s")
    return proc.pid, line.split()[1]
