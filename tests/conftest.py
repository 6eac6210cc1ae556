"""Shared fixtures: a real S3-compatible server process on loopback, the fault/shaping proxy in front of
it, and small datasets. Plain helpers the test modules share are in tests/helpers.py.

The S3 endpoint is moto's server started as a separate process on a free 127.0.0.1 port (not the
in-process mock), so boto3 and ibm_boto3 talk real HTTP to it; it is stopped by its pid.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from rig import locals3
from rig.netproxy import NetProxy
from tests.helpers import TALLY_KEY, FaultTally


def pytest_configure(config: pytest.Config) -> None:
    # Never let an SDK look for cloud credentials on the network (instance metadata endpoints): tests
    # talk to 127.0.0.1 only.
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[locals3.LocalS3]:
    log = tmp_path_factory.mktemp("moto") / "server.log"
    server = locals3.start(log_path=log)
    try:
        yield server
    finally:
        locals3.stop(server.pid)


@pytest.fixture
def s3_env(s3_server: locals3.LocalS3, monkeypatch: pytest.MonkeyPatch) -> locals3.LocalS3:
    """The environment pointed at the local server (and nothing else: no real AWS config)."""
    for key in list(os.environ):
        if key.startswith(("AWS_", "IBM_", "COS_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("COS_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture
def bucket(s3_env: locals3.LocalS3) -> str:
    """A fresh, empty bucket on the local server."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    locals3.create_bucket(s3_env.endpoint, name)
    return name


@pytest.fixture
def proxy(s3_env: locals3.LocalS3) -> Iterator[NetProxy]:
    """The proxy (rig.netproxy: unshaped, no faults until a test adds them) in front of the local server."""
    with NetProxy(s3_env.endpoint) as p:
        yield p


@pytest.fixture
def tally(request: pytest.FixtureRequest) -> FaultTally:
    """The session's faults table, which fault-injection tests add their outcomes to."""
    return request.config.stash.setdefault(TALLY_KEY, FaultTally())


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic png dataset on local disk: 600 train / 200 test samples, shards of 100."""
    from shardgen import ShardgenConfig, build

    root = tmp_path_factory.mktemp("tiny") / "ds"
    build(
        ShardgenConfig(
            dest=str(root),
            source="synthetic",
            fmt="png",
            shard_size=100,
            synthetic_train=600,
            synthetic_test=200,
            allow_download=False,
        )
    )
    return root


@pytest.fixture(scope="session")
def auth_s3_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[locals3.LocalS3, dict[str, str]]]:
    """A moto server that checks credentials: (server, good env with a bucket 'authed')."""
    import boto3

    log = tmp_path_factory.mktemp("moto-auth") / "server.log"
    # The first three requests (create user, key, policy) are unauthenticated; every later one is checked.
    server = locals3.start(log_path=log, env={"INITIAL_NO_AUTH_ACTION_COUNT": "3"})
    try:
        iam = boto3.client(
            "iam",
            endpoint_url=server.endpoint,
            aws_access_key_id="bootstrap",
            aws_secret_access_key="bootstrap",
            region_name="us-east-1",
        )
        iam.create_user(UserName="feedrate")
        key = iam.create_access_key(UserName="feedrate")["AccessKey"]
        iam.put_user_policy(
            UserName="feedrate",
            PolicyName="all",
            PolicyDocument='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}',
        )
        env = {
            **server.env(),
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
        }
        s3 = boto3.client(
            "s3",
            endpoint_url=server.endpoint,
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
        )
        s3.create_bucket(Bucket="authed")
        yield server, env
    finally:
        locals3.stop(server.pid)


@pytest.fixture(scope="session")
def make_encoded_dataset(tmp_path_factory: pytest.TempPathFactory):
    """Factory: a lossless dataset (png or raw) of encoded images, built by shardgen from CIFAR batches.

    Call as make_encoded_dataset(fmt="png", n_train=..., n_test=..., shard_size=...) -> root Path.
    Train sample i has index i; test sample j has index 10_000 + j.
    """
    from encoded import encoded_images

    from feedrate.cifar import CLASS_NAMES, write_batch_dir
    from shardgen import ShardgenConfig, build

    made: dict[tuple, Path] = {}

    def make(fmt: str = "png", n_train: int = 300, n_test: int = 100, shard_size: int = 100) -> Path:
        key = (fmt, n_train, n_test, shard_size)
        if key not in made:
            base = tmp_path_factory.mktemp("encoded")
            splits = {"train": encoded_images(n_train), "test": encoded_images(n_test, offset=10_000)}
            write_batch_dir(base / "src" / "cifar-10-batches-py", splits, CLASS_NAMES, label="encoded")
            build(
                ShardgenConfig(
                    dest=str(base / "ds"),
                    source=str(base / "src"),
                    fmt=fmt,
                    shard_size=shard_size,
                    allow_download=False,
                )
            )
            made[key] = base / "ds"
        return made[key]

    return make


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """The faults table of tests/test_faults.py (faults injected, survived, failed cleanly, samples lost),
    printed whenever fault-injection tests ran, with or without output capture."""
    tally = config.stash.get(TALLY_KEY, None)
    if tally is None or not tally.outcomes:
        return
    terminalreporter.write_sep("=", "faults table")
    for line in tally.table().splitlines():
        terminalreporter.write_line(line)
