"""Every command line's usage error or bad value is one line on stderr and exit code 2 (feedrate.errors)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "shardgen", "--dest", "x", "--bogus"],
        ["train.py", "--bogus"],
        ["-m", "report"],
        ["-m", "rig", "sideways"],
        ["-m", "bench", "--bogus"],
        ["-m", "bench.compare", "--bogus"],
        ["-m", "bench.measure", "--bogus"],
        ["-m", "rig.netproxy", "--bogus"],
        ["train.py", "--seed", "-1"],  # a bad value, not only a bad flag
        ["-m", "shardgen", "--dest", "x", "--source", "synthetic", "--seed", "-1"],
    ],
)
def test_a_usage_error_is_one_line_and_exit_2(command: list[str], tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, *command],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0], out.stderr
    assert "usage:" not in out.stderr
