"""`make s3-up NET=...`: the local endpoint behind the shaping proxy, as processes of their own, with env
files that point the SDKs at the proxy; `make s3-down` stops both."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from rig import locals3

REPO = Path(__file__).resolve().parents[1]


def run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "AWS_EC2_METADATA_DISABLED": "true"}
    return subprocess.run(
        [sys.executable, "-m", "rig.locals3", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_with_a_network_preset_then_down(tmp_path: Path) -> None:
    up = run(tmp_path, "up", "--net", "home", "--bucket", "shaped")
    state = tmp_path / ".s3-local"
    try:
        assert up.returncode == 0, up.stderr
        server_pid, proxy_pid = int((state / "pid").read_text()), int((state / "proxy_pid").read_text())
        endpoint = (state / "endpoint").read_text().strip()
        env = dict(
            line.removeprefix("export ").split("=", 1) for line in (state / "env").read_text().splitlines()
        )
        assert env["AWS_ENDPOINT_URL"] == env["COS_ENDPOINT"] == endpoint
        assert "shaped as 'home'" in up.stdout and endpoint in up.stdout
        client = locals3.client(endpoint)
        client.put_object(Bucket="shaped", Key="x", Body=b"\0" * 1_250_000)
        t0 = time.perf_counter()
        body = client.get_object(Bucket="shaped", Key="x")["Body"].read()
        seconds = time.perf_counter() - t0
        # home: 40 +- 10 ms to the first byte, then 1.25 MB at 12.5 MB/s = 0.1 s
        assert len(body) == 1_250_000 and seconds >= 0.03 + 0.1
    finally:
        down = run(tmp_path, "down")
    assert down.returncode == 0, down.stderr
    for pid in (server_pid, proxy_pid):
        deadline = time.monotonic() + 10
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(pid), "s3-down stops the server and the proxy"
    assert not any(state.glob("*pid")) and not (state / "env").exists()


def test_unknown_preset_starts_nothing(tmp_path: Path) -> None:
    up = run(tmp_path, "up", "--net", "moon")
    assert up.returncode == 2
    assert up.stderr.strip() == (
        "s3-local: error: unknown network preset 'moon'; accepted: loopback, same-region, cross-region, home"
    )
    assert not (tmp_path / ".s3-local").exists()
