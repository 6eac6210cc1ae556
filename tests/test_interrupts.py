"""Ctrl-C and SIGTERM while shardgen publishes to an object store: no manifest, no staging files left, and
no multipart upload left open on the server (an open one is invisible in listings and billed until a
lifecycle rule removes it).

The interrupt must land while a multipart upload is in flight, so the test makes one wait: the proxy
holds the answer to one part upload (rig/netproxy.py `Stall`), the test sees the upload open on the
server, and only then sends the signal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from feedrate.manifest import MANIFEST_NAME
from feedrate.storage import MULTIPART_THRESHOLD, READ_TIMEOUT_ENV, open_store
from rig import locals3
from rig.netproxy import NetProxy, Stall

REPO = Path(__file__).resolve().parents[1]
# One raw shard of 4,000 samples is 18.4 MB: above the 16 MiB multipart threshold, three 8 MiB parts.
SAMPLES = 4000
RAW_SAMPLE_TAR_BYTES = 4608  # 512 + 3,072 (image) + 512 + 512 (label)


def open_uploads(endpoint: str, bucket: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=endpoint)
    return [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


@pytest.mark.parametrize(("scheme", "sig"), [("s3", signal.SIGTERM), ("cos", signal.SIGINT)])
def test_an_interrupted_multipart_upload_is_aborted(
    scheme: str, sig: signal.Signals, bucket: str, s3_env: locals3.LocalS3, tmp_path: Path
) -> None:
    assert SAMPLES * RAW_SAMPLE_TAR_BYTES > MULTIPART_THRESHOLD, "the shard must go up in parts"
    staging = tmp_path / "tmp"
    staging.mkdir()
    url = f"{scheme}://{bucket}/ds"
    with NetProxy(s3_env.endpoint) as proxy:
        proxy.add(Stall(method="PUT", path_contains="partNumber=2", seconds=60))
        cmd = [sys.executable, "-m", "shardgen", "--dest", url, "--source", "synthetic", "--format", "raw"]
        cmd += ["--synthetic-train", str(SAMPLES), "--synthetic-test", "10", "--shard-size", str(SAMPLES)]
        cmd += ["--no-download", "--endpoint-url", proxy.endpoint]
        # A 2 s read timeout: the held part fails over quickly once the transfer is being cancelled.
        env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(staging), READ_TIMEOUT_ENV: "2"}
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            deadline = time.monotonic() + 90
            while not proxy.requests("PUT", "partNumber=2"):
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                time.sleep(0.05)
            assert open_uploads(s3_env.endpoint, bucket) == ["ds/train-000000.tar"]
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().endswith("shardgen: interrupted"), err
    assert open_uploads(s3_env.endpoint, bucket) == [], "the multipart upload was aborted"
    store = open_store(url)
    assert not store.exists(MANIFEST_NAME)
    assert not [n for n in store.list() if n.startswith("train-")], "the shard never completed"
    assert list(staging.iterdir()) == [], "the staging directory was removed"
