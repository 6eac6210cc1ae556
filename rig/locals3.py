"""A local S3-compatible server (moto's) on 127.0.0.1, for demos, tests and benchmarks.

Both boto3 (`s3://`) and ibm_boto3 (`cos://`, HMAC keys) speak to it over real HTTP. The server runs as
its own process; `start` returns its pid and endpoint, `stop` ends it by pid. The server with a bucket
and the shaping proxy in front, as the bench, compare and `make s3-up` use it, is rig.endpoint's; the
`make s3-up` / `make s3-down` command line is rig/__main__.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from feedrate.errors import FeedrateError

HOST = "127.0.0.1"
_REQUEST_LINE = re.compile(r'"([A-Z]+) (\S+) HTTP/[0-9.]+"')
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the server colours non-200 lines
# moto accepts any key pair; these are placeholders, not secrets.
LOCAL_ACCESS_KEY = "feedrate-local"
LOCAL_SECRET_KEY = "feedrate-local-secret"
LOCAL_REGION = "us-east-1"


@dataclass(frozen=True)
class LocalS3:
    pid: int
    endpoint: str
    log_path: Path | None = None

    def requests(self, method: str | None = None, path_prefix: str = "") -> list[str]:
        """Requests the server logged ("GET /bucket/key"), optionally filtered: counted at the server."""
        if self.log_path is None or not self.log_path.exists():
            raise FeedrateError("this server was started without a log; pass log_path to start()")
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            match = _REQUEST_LINE.search(_ANSI.sub("", line))
            if not match:
                continue
            verb, path = match.group(1), match.group(2)
            if (method is None or verb == method) and path.startswith(path_prefix):
                found.append(f"{verb} {path}")
        return found

    def env(self) -> dict[str, str]:
        """Variables that point boto3 and ibm_boto3 at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "COS_ENDPOINT": self.endpoint,
            "AWS_ACCESS_KEY_ID": LOCAL_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": LOCAL_SECRET_KEY,
            "AWS_DEFAULT_REGION": LOCAL_REGION,
        }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _moto_server_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("moto_server")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("moto_server")
    if found:
        return [found]
    raise FeedrateError("moto_server not found: pip install 'moto[server]' (requirements-dev.txt)")


def start(
    port: int | None = None,
    log_path: Path | None = None,
    timeout_s: float = 30.0,
    env: dict[str, str] | None = None,
) -> LocalS3:
    """Start moto's server on 127.0.0.1 and wait until it answers.

    `env` adds server settings, e.g. INITIAL_NO_AUTH_ACTION_COUNT=N to make moto check credentials
    (against its IAM) after the first N requests.
    """
    port = port or free_port()
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        [*_moto_server_cmd(), "-H", HOST, "-p", str(port)],
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        start_new_session=True,  # outlives `make s3-up`; stopped by pid
    )
    endpoint = f"http://{HOST}:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FeedrateError(f"moto_server exited with code {proc.returncode} on port {port}")
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
                return LocalS3(proc.pid, endpoint, log_path)
        except OSError:
            time.sleep(0.1)
    stop(proc.pid)
    raise FeedrateError(f"moto_server did not answer on {endpoint} within {timeout_s:.0f} s")


def stop(pid: int, timeout_s: float = 10.0) -> None:
    """Stop the server process `pid` (TERM, then KILL)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
        except ChildProcessError:  # not our child: poll for its disappearance
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def client(endpoint: str) -> Any:
    """A boto3 S3 client for a local endpoint (the server itself or a proxy in front of it), with the
    placeholder keys moto accepts, whatever the environment says: its session ignores AWS_PROFILE (a
    caller's profile that this machine lacks must not break the rig, nor one it has sign requests)."""
    import boto3
    import botocore.session

    isolated = botocore.session.Session(session_vars={"profile": (None, None, None, None)})
    return boto3.session.Session(botocore_session=isolated).client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=LOCAL_ACCESS_KEY,
        aws_secret_access_key=LOCAL_SECRET_KEY,
        region_name=LOCAL_REGION,
    )


def create_bucket(endpoint: str, bucket: str) -> None:
    client(endpoint).create_bucket(Bucket=bucket)
