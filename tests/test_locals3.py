"""`make s3-up NET=...`: the local endpoint behind the shaping proxy, as processes of their own, with env
files that point the SDKs at the proxy; `make s3-down` stops both, and only them; `make LOCAL_S3=1`
is the only way a make command's traffic goes to that endpoint, and then with placeholder keys."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rig import locals3, pidfile
from rig.__main__ import write_env_files
from rig.endpoint import CALLER_CREDENTIALS, LocalEndpoint

REPO = Path(__file__).resolve().parents[1]


def run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "AWS_EC2_METADATA_DISABLED": "true"}
    return subprocess.run(
        [sys.executable, "-m", "rig", *args],
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
        server_pid = int((state / "pid").read_text().split()[0])
        proxy_pid = int((state / "proxy_pid").read_text().split()[0])
        endpoint = (state / "endpoint").read_text().strip()
        env = dict(
            line.removeprefix("export ").split("=", 1)
            for line in (state / "env").read_text().splitlines()
            if line.startswith("export ")
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


@pytest.fixture
def stranger() -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated live process of the user's (what a stale pid file may name after a reboot)."""
    proc = subprocess.Popen(["sleep", "120"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("content", ["{pid}\n", "{pid} 1\n"], ids=["pid only", "pid and other start time"])
def test_down_never_signals_a_process_the_rig_did_not_start(
    tmp_path: Path, stranger: subprocess.Popen[bytes], content: str
) -> None:
    state = tmp_path / ".s3-local"
    state.mkdir()
    for name in ("pid", "proxy_pid"):
        (state / name).write_text(content.format(pid=stranger.pid))
    (state / "env.mk").write_text("override AWS_ENDPOINT_URL := http://127.0.0.1:9\n")
    down = run(tmp_path, "down")
    assert down.returncode == 0, down.stderr
    time.sleep(0.3)  # a SIGTERM would have landed by now
    assert stranger.poll() is None, "the unrelated process is alive"
    assert f"pid {stranger.pid} is another process (sleep)" in down.stderr
    assert "removed the stale pid file, signalled nothing" in down.stderr
    assert "local S3 is not running" in down.stdout
    assert not any(state.iterdir()), "the stale pid files and the leftover env.mk are gone"


def test_up_over_a_stale_pid_file_starts_a_server(tmp_path: Path, stranger: subprocess.Popen[bytes]) -> None:
    state = tmp_path / ".s3-local"
    state.mkdir()
    (state / "pid").write_text(f"{stranger.pid}\n")
    up = run(tmp_path, "up", "--bucket", "fresh")
    try:
        assert up.returncode == 0, up.stderr
        assert "already running" not in up.stdout and "removed the stale pid file" in up.stderr
        pid, started = map(int, (state / "pid").read_text().split())
        assert pid != stranger.pid and started == pidfile.start_ticks(pid)
        endpoint = (state / "endpoint").read_text().strip()
        assert "fresh" in [b["Name"] for b in locals3.client(endpoint).list_buckets()["Buckets"]]
    finally:
        down = run(tmp_path, "down")
    assert down.returncode == 0 and f"local S3 stopped (pid {pid})" in down.stdout, down.stderr
    assert stranger.poll() is None


def test_pidfile_accepts_only_the_process_it_recorded(
    tmp_path: Path, stranger: subprocess.Popen[bytes]
) -> None:
    path = tmp_path / "pid"
    pidfile.write(path, stranger.pid)
    assert pidfile.owned(path, "sleep") == stranger.pid and path.exists()
    assert pidfile.owned(path, "moto_server") is None and not path.exists()
    started = pidfile.start_ticks(stranger.pid)
    assert started is not None
    path.write_text(f"{stranger.pid} {started + 1}\n")
    assert pidfile.owned(path, "sleep") is None, "same pid, other start time: a reused pid"
    path.write_text("garbage\n")
    assert pidfile.owned(path, "sleep") is None and not path.exists()
    assert pidfile.owned(path, "sleep") is None, "no file: nothing to signal"


# -- make LOCAL_S3=1 ------------------------------------------------------------------------------------
USER_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIAUSERREALKEY00000",
    "AWS_SECRET_ACCESS_KEY": "user-real-secret",
    "AWS_SESSION_TOKEN": "user-session-token",
    "AWS_PROFILE": "prod",
    "IBM_API_KEY_ID": "user-ibm-api-key",
}


@pytest.fixture
def make_dir(tmp_path: Path) -> Path:
    """A copy of the Makefile with a leftover .s3-local/env.mk (as `make s3-up` writes it) and a stand-in
    .venv/bin/python that prints the environment the recipe gave it, instead of running anything."""
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    for name in ("requirements.txt", "requirements-dev.txt"):
        (tmp_path / name).write_text("")
    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)
    fake = venv / "bin" / "python"
    fake.write_text(
        f"#!/bin/sh\nexec {sys.executable} -c 'import json, os; print(json.dumps(dict(os.environ)))'\n"
    )
    fake.chmod(0o755)
    for stamp in (".stamp-runtime", ".stamp-dev"):
        (venv / stamp).touch()
        os.utime(venv / stamp, (time.time() + 60, time.time() + 60))  # newer than the requirements
    (tmp_path / ".s3-local").mkdir()
    leftover = LocalEndpoint(locals3.LocalS3(pid=0, endpoint="http://127.0.0.1:9"), "feedrate")
    write_env_files(tmp_path / ".s3-local", leftover.env())
    return tmp_path


def make(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "IBM_", "COS_", "LOCAL_S3"))}
    return subprocess.run(
        ["make", "--no-print-directory", *args],
        cwd=cwd,
        env={**env, **USER_ENV},
        capture_output=True,
        text=True,
        timeout=60,
    )


def recipe_env(done: subprocess.CompletedProcess[str]) -> dict[str, str]:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_leftover_local_endpoint_does_not_capture_make_traffic(make_dir: Path) -> None:
    done = make(make_dir, "shards", "DEST=s3://real-bucket/cifar10")
    env = recipe_env(done)
    assert "AWS_ENDPOINT_URL" not in env and "COS_ENDPOINT" not in env, "the real endpoint, not 127.0.0.1:9"
    assert {k: env.get(k) for k in USER_ENV} == USER_ENV, "the user's own settings, untouched"
    assert "local S3" not in done.stdout


def test_local_s3_1_uses_the_endpoint_visibly_with_placeholder_keys(make_dir: Path) -> None:
    done = make(make_dir, "shards", "DEST=s3://feedrate/cifar10", "LOCAL_S3=1")
    env = recipe_env(done)
    assert done.stdout.splitlines()[0] == (
        "using the local S3 endpoint http://127.0.0.1:9 with placeholder credentials (LOCAL_S3=1)"
    )
    assert env["AWS_ENDPOINT_URL"] == env["COS_ENDPOINT"] == "http://127.0.0.1:9"
    assert env["AWS_ACCESS_KEY_ID"] == locals3.LOCAL_ACCESS_KEY
    assert env["AWS_SECRET_ACCESS_KEY"] == locals3.LOCAL_SECRET_KEY
    assert not set(CALLER_CREDENTIALS) & set(env), "no session token, profile or IBM API key passed on"
    assert not any(v in done.stdout + done.stderr for v in USER_ENV.values())


def test_local_s3_without_an_endpoint_or_with_a_bad_value_is_one_line(make_dir: Path) -> None:
    bad = make(make_dir, "shards", "LOCAL_S3=yes")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "LOCAL_S3=yes: accepted values are 1 (use the make s3-up endpoint) or empty" in bad.stderr
    shutil.rmtree(make_dir / ".s3-local")
    gone = make(make_dir, "shards", "LOCAL_S3=1")
    assert gone.returncode == 2 and len(gone.stderr.strip().splitlines()) == 1
    assert "LOCAL_S3=1: no local S3 endpoint is running" in gone.stderr
    assert make(make_dir, "s3-down", "LOCAL_S3=1").returncode == 0, "s3-up/s3-down: LOCAL_S3 does not apply"
