"""Secrets never leave the process: shardgen, train.py and the loaders run with known fake secrets in
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN and IBM_API_KEY_ID (and a known access key id), against the
local S3 server through s3:// (HMAC keys and a session token) and cos:// (an API key, exchanged for an
IAM token at a fake IAM endpoint on loopback), succeeding and failing, and everything they write is
scanned: stdout, stderr, the CSV, run.json, the dataset's manifest, and the text of every exception.
The IAM token the fake endpoint hands out is a secret too.

A secret could leak whole or in part (a truncated repr, a message cut at 120 characters), so each one is
looked for whole and by its first 12 characters.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from feedrate.errors import FeedrateError
from loaders import LoaderConfig, make_loader
from rig import locals3
from rig.netproxy import NetProxy, Truncate

REPO = Path(__file__).resolve().parents[1]
LOCAL_KEYS = {"aws_access_key_id": "test", "aws_secret_access_key": "test", "region_name": "us-east-1"}
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKEKEYID7Q2W9E4",
    "AWS_SECRET_ACCESS_KEY": "fakeSecretKey/Zx81+Qp0LmN4vB7rT2yU9wE3sD6fG5hJ",
    "AWS_SESSION_TOKEN": "fakeSessionToken/IQoJb3JpZ2luX2VjEJr//////////wEaCXVzLWVhc3QtMSJHMEU",
    "IBM_API_KEY_ID": "fakeIbmApiKey-0nQ7xK2vL9pR4sT6uW8yZ1aB3cD5eF7g",
    "IAM access token": "eyJfakeIamAccessToken.Zm9vYmFyYmF6cXV4.c2lnbmF0dXJl",
    "IAM refresh token": "fakeIamRefreshToken-Rf0c3K7mN2pQ8sV1wX4yZ6aB9",
}


class _FakeIam(http.server.BaseHTTPRequestHandler):
    """IBM IAM's token endpoint, as ibm_botocore calls it: POST an API key, get a bearer token."""

    asked = 0  # token requests served (the cos:// runs must really use the API key)

    def do_POST(self) -> None:
        type(self).asked += 1
        form = urllib.parse.parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
        known = form.get("apikey") == [SECRETS["IBM_API_KEY_ID"]] or form.get("refresh_token")
        body = json.dumps(
            {
                "access_token": SECRETS["IAM access token"],
                "refresh_token": SECRETS["IAM refresh token"],
                "token_type": "Bearer",
                "expires_in": 3600,
                "expiration": int(time.time()) + 3600,
            }
            if known
            else {"errorCode": "BXNIM0415E", "errorMessage": "Provided API key could not be found."}
        ).encode()
        self.send_response(200 if known else 400)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def fake_iam() -> Iterator[str]:
    """The token URL of a fake IAM endpoint on 127.0.0.1."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeIam)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/identity/token"
    finally:
        server.shutdown()
        server.server_close()


def leaks(text: str) -> list[str]:
    """The names of the secrets `text` shows, whole or by their first 12 characters."""
    return [name for name, value in SECRETS.items() if value in text or value[:12] in text]


def test_the_scan_finds_a_secret_whole_or_cut() -> None:
    token = SECRETS["AWS_SESSION_TOKEN"]
    assert leaks(f"header: {token}") == ["AWS_SESSION_TOKEN"]
    assert leaks(f"repr(...{token[:15]}...)") == ["AWS_SESSION_TOKEN"]
    assert leaks("nothing to see") == []


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def secrets_env(server: locals3.LocalS3, token_url: str) -> dict[str, str]:
    """An environment for the local server holding the fake secrets (moto accepts any key and any
    token), with the IAM token endpoint on loopback: nothing leaves 127.0.0.1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "IBM_", "COS_"))}
    env |= server.env() | {name: value for name, value in SECRETS.items() if name.isupper()}
    env |= {"IBM_SERVICE_INSTANCE_ID": "crn:v1:fake:instance", "IBM_AUTH_ENDPOINT": token_url}
    return env | {"AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}


@pytest.fixture
def secret_env(s3_env: locals3.LocalS3, fake_iam: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """`secrets_env`, in this process's environment too (for the loaders run here)."""
    env = secrets_env(s3_env, fake_iam)
    for name, value in env.items():
        if name.startswith(("AWS_", "IBM_")):
            monkeypatch.setenv(name, value)
    return env


def run(args: list[str], env: dict[str, str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env={**env, "PYTHONPATH": str(REPO), "CI": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def written(root: Path) -> Iterator[tuple[Path, str]]:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            yield path, path.read_bytes().decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def published(
    s3_server: locals3.LocalS3, fake_iam: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """A tiny dataset published by shardgen (a subprocess) to s3:// and cos://, with the fake secrets;
    its output and the manifests it wrote are scanned. The cos:// one goes through the API key."""
    bucket = "secrets-scan"
    locals3.create_bucket(s3_server.endpoint, bucket)
    env, cwd = secrets_env(s3_server, fake_iam), tmp_path_factory.mktemp("publish")
    urls = {}
    for scheme in ("s3", "cos"):
        url = f"{scheme}://{bucket}/ds-{scheme}"
        args = ["-m", "shardgen", "--dest", url, "--source", "synthetic", "--format", "png", "--no-download"]
        args += ["--synthetic-train", "48", "--synthetic-test", "16", "--shard-size", "16"]
        asked = _FakeIam.asked
        done = run(args, env, cwd)
        assert done.returncode == 0, done.stderr
        assert (_FakeIam.asked > asked) == (scheme == "cos"), "cos:// authenticates with the API key"
        assert leaks(done.stdout + done.stderr) == [], f"shardgen {scheme}"
        manifest = (
            boto3.client("s3", endpoint_url=s3_server.endpoint, **LOCAL_KEYS)
            .get_object(Bucket=bucket, Key=f"ds-{scheme}/manifest.json")["Body"]
            .read()
        )
        assert leaks(manifest.decode()) == []
        urls[scheme] = url
    return urls


@pytest.mark.parametrize(("scheme", "loader"), [("s3", "wds"), ("cos", "torchvision")])
def test_train_writes_no_secret(
    published: dict[str, str], secret_env: dict[str, str], scheme: str, loader: str, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = [str(REPO / "train.py"), "--loader", loader, "--data", published[scheme], "--out", str(out)]
    args += ["--arch", "small", "--device", "cpu", "--epochs", "1", "--batch-size", "16", "--workers", "1"]
    asked = _FakeIam.asked
    done = run(args, secret_env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert (_FakeIam.asked > asked) == (scheme == "cos"), "cos:// authenticates with the API key"
    assert leaks(done.stdout + done.stderr) == []
    files = dict(written(out))
    assert {p.name for p in files} >= {"train.csv", "run.json"}
    for path, text in files.items():
        assert leaks(text) == [], path


def test_failures_name_no_secret(
    secret_env: dict[str, str], published: dict[str, str], s3_env: locals3.LocalS3, tmp_path: Path
) -> None:
    """Error paths are where secrets slip out (a repr of a client, a request's headers): provoke several."""
    messages: list[str] = []

    def failing(fn: object) -> None:
        with pytest.raises(FeedrateError) as info:
            fn()  # type: ignore[operator]
        messages.append(str(info.value))

    cfg = {"split": "train", "batch_size": 8, "train": True, "cache_dir": str(tmp_path / "cache")}
    for scheme in ("s3", "cos"):
        failing(lambda s=scheme: make_loader("wds", LoaderConfig(data=f"{s}://no-such-bucket-x/ds", **cfg)))
    closed = f"http://127.0.0.1:{closed_port()}"
    failing(
        lambda: make_loader("torchvision", LoaderConfig(data=published["s3"], endpoint_url=closed, **cfg))
    )
    with NetProxy(s3_env.endpoint) as proxy:
        proxy.add(Truncate(path_contains="/ds-s3/", after_bytes=100, times=None))
        failing(
            lambda: make_loader(
                "tensor", LoaderConfig(data=published["s3"], endpoint_url=proxy.endpoint, **cfg)
            )
        )
    assert len(messages) == 4
    for message in messages:
        assert leaks(message) == [], message


@pytest.mark.parametrize("iam", ["refuses the key", "is unreachable"])
def test_an_api_key_that_gets_no_token_is_not_printed(
    secret_env: dict[str, str], bucket: str, iam: str, tmp_path: Path
) -> None:
    """IBM COS with an API key whose token request fails: one line naming the token endpoint, and
    neither it nor any other output carries the key."""
    env = dict(secret_env)
    if iam == "refuses the key":
        env["IBM_API_KEY_ID"] = SECRETS["IBM_API_KEY_ID"][::-1]  # a wrong key: still a secret's text
    else:
        env["IBM_AUTH_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}/identity/token"
    args = ["-m", "shardgen", "--dest", f"cos://{bucket}/ds", "--source", "synthetic", "--no-download"]
    args += ["--synthetic-train", "16", "--synthetic-test", "8"]
    done = run(args, env, tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shardgen: error: cannot get an IAM token for "), (
        done.stderr
    )
    assert leaks(done.stdout + done.stderr) == [] and env["IBM_API_KEY_ID"][:12] not in done.stderr
