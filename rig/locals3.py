"""A local S3-compatible endpoint (moto's server) on 127.0.0.1, for demos, tests and benchmarks.

Both boto3 (`s3://`) and ibm_boto3 (`cos://`, HMAC keys) speak to it over real HTTP. The server runs as
its own process; `start` returns its pid and endpoint, `stop` ends it by pid. `python -m
rig.locals3 up|down` is what `make s3-up` / `make s3-down` run: state (pid, endpoint, an env file
to source) lives in `.s3-local/`. `up --net PRESET` (`make s3-up NET=home`) also starts the shaping
proxy (rig.netproxy) in front of the server and points the env files at the proxy, so that every
tool run against it meets that network.
"""

from __future__ import annotations

import argparse
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

from feedrate.errors import FeedrateError, run_cli

HOST = "127.0.0.1"
_REQUEST_LINE = re.compile(r'"([A-Z]+) (\S+) HTTP/[0-9.]+"')
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the server colours non-200 lines
# moto accepts any key pair; these are placeholders, not secrets.
LOCAL_ACCESS_KEY = "feedrate-local"
LOCAL_SECRET_KEY = "feedrate-local-secret"
LOCAL_REGION = "us-east-1"
STATE_DIR = Path(".s3-local")
DEFAULT_BUCKET = "feedrate"


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
    placeholder keys moto accepts, whatever the environment says."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=LOCAL_ACCESS_KEY,
        aws_secret_access_key=LOCAL_SECRET_KEY,
        region_name=LOCAL_REGION,
    )


def create_bucket(endpoint: str, bucket: str) -> None:
    client(endpoint).create_bucket(Bucket=bucket)


def start_proxy(
    upstream: str, net: str, log_path: Path | None = None, timeout_s: float = 30.0
) -> tuple[int, str]:
    """The shaping proxy for preset `net` in front of `upstream`, as its own process: (pid, endpoint)."""
    from feedrate.network import preset

    preset(net)  # an unknown name fails here, naming the accepted ones
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "rig.netproxy", "--upstream", upstream, "--net", net],
        stdout=subprocess.PIPE,
        stderr=log,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # outlives `make s3-up`; stopped by pid
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    line = ""
    while time.monotonic() < deadline and not line:
        line = proc.stdout.readline().strip()
        if not line and proc.poll() is not None:
            raise FeedrateError(f"the shaping proxy exited with code {proc.returncode}")
    proc.stdout.close()
    if not line.startswith("endpoint "):
        stop(proc.pid)
        raise FeedrateError(f"the shaping proxy did not report its endpoint within {timeout_s:.0f} s")
    return proc.pid, line.split()[1]


def _up(bucket: str, net: str = "") -> None:
    if net:
        from feedrate.network import preset

        preset(net)  # before anything starts: an unknown name is a one-line error naming the accepted ones
    pid_file = STATE_DIR / "pid"
    if pid_file.exists():
        pid = int(pid_file.read_text())
        try:
            os.kill(pid, 0)
            endpoint = (STATE_DIR / "endpoint").read_text().strip()
            print(f"local S3 already running (pid {pid}) at {endpoint}")
            return
        except ProcessLookupError:
            pid_file.unlink()
    STATE_DIR.mkdir(exist_ok=True)
    server = start(log_path=STATE_DIR / "server.log")
    pid_file.write_text(f"{server.pid}\n")
    endpoint, env = server.endpoint, server.env()
    if net and net != "loopback":
        try:
            proxy_pid, endpoint = start_proxy(server.endpoint, net, STATE_DIR / "proxy.log")
        except BaseException:
            _down()
            raise
        (STATE_DIR / "proxy_pid").write_text(f"{proxy_pid}\n")
        env = env | {"AWS_ENDPOINT_URL": endpoint, "COS_ENDPOINT": endpoint}
    (STATE_DIR / "endpoint").write_text(endpoint + "\n")
    env_lines = [f"export {k}={v}" for k, v in env.items()]
    (STATE_DIR / "env").write_text("\n".join(env_lines) + "\n")
    (STATE_DIR / "env.mk").write_text("\n".join(f"{k} ?= {v}\nexport {k}" for k, v in env.items()) + "\n")
    create_bucket(server.endpoint, bucket)
    print(f"local S3 (moto) running, pid {server.pid}, endpoint {server.endpoint}, bucket '{bucket}'")
    if endpoint != server.endpoint:
        print(f"shaped as '{net}' through the proxy at {endpoint} (the env files point there)")
    print("make targets pick it up by themselves; in a shell:  source .s3-local/env")
    print(f"then e.g.  make shards DEST=s3://{bucket}/cifar10   or   DEST=cos://{bucket}/cifar10")


def _down() -> None:
    pid_file = STATE_DIR / "pid"
    if not pid_file.exists():
        print("local S3 is not running")
        return
    proxy_file = STATE_DIR / "proxy_pid"
    if proxy_file.exists():
        stop(int(proxy_file.read_text()))
    pid = int(pid_file.read_text())
    stop(pid)
    for name in ("pid", "proxy_pid", "endpoint", "env", "env.mk"):
        (STATE_DIR / name).unlink(missing_ok=True)
    print(f"local S3 stopped (pid {pid})")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="locals3", description="A local S3 endpoint on 127.0.0.1.")
    p.add_argument("action", choices=["up", "down"])
    p.add_argument("--bucket", default=DEFAULT_BUCKET, help="bucket to create (default: %(default)s)")
    p.add_argument("--net", default="", help="a network preset to shape the endpoint as (feedrate.network)")
    args = p.parse_args(argv)
    run_cli("s3-local", lambda: _up(args.bucket, args.net) if args.action == "up" else _down())


if __name__ == "__main__":
    main()
