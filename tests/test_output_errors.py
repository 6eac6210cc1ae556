"""An output location that cannot take the output: a path through a file, a read-only directory, a full
disk. train.py and shardgen say so in one line (exit code 2), with no traceback, and leave no
half-written dataset behind.

A full disk is simulated two ways, both real failures of real writes: a file size limit on the process
(RLIMIT_FSIZE: the kernel fails any write past it with EFBIG, as a full disk fails it with ENOSPC, and it
needs no root and no mount), and, where only the destination must be full while the staging area is
not, the destination's copy failing with ENOSPC.
"""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from feedrate.manifest import MANIFEST_NAME

REPO = Path(__file__).resolve().parents[1]


def run(args: list[str], cwd: Path, fsize: int | None = None, env: dict[str, str] | None = None):
    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), "CI": "1", "PYTHONDONTWRITEBYTECODE": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        preexec_fn=limit,  # only sets a resource limit in the child
    )


def one_line_error(done: subprocess.CompletedProcess, prog: str) -> str:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), done.stderr
    return lines[0]


def train_args(data: Path, out: Path) -> list[str]:
    args = [str(REPO / "train.py"), "--data", str(data), "--out", str(out), "--arch", "small"]
    return [*args, "--device", "cpu", "--workers", "0", "--batch-size", "50", "--max-batches", "3"]


# -- train.py --out -------------------------------------------------------------------------------------
def test_train_out_through_a_file(tiny_dataset: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    line = one_line_error(run(train_args(tiny_dataset, blocker / "run"), tmp_path), "train.py")
    assert str(blocker / "run") in line and "Not a directory" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_train_out_in_a_read_only_directory(tiny_dataset: Path, tmp_path: Path) -> None:
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        line = one_line_error(run(train_args(tiny_dataset, parent / "run"), tmp_path), "train.py")
    finally:
        parent.chmod(0o755)
    assert str(parent / "run") in line and "Permission denied" in line


def test_train_on_a_full_disk(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    line = one_line_error(run(train_args(tiny_dataset, out), tmp_path, fsize=1024), "train.py")
    assert "File too large" in line
    assert f"cannot write {out}/" in line, "the message names the file that could not be written"


# -- shardgen --dest ------------------------------------------------------------------------------------
SHARDGEN = ["-m", "shardgen", "--source", "synthetic", "--no-download", "--format", "raw"]
SHARDGEN += ["--synthetic-train", "200", "--synthetic-test", "50", "--shard-size", "100"]


def test_shardgen_on_a_full_disk(tmp_path: Path) -> None:
    """Every write is limited: the staging area fills first. Nothing is left behind, there or at dest."""
    staging, dest = tmp_path / "tmp", tmp_path / "ds"
    staging.mkdir()
    done = run([*SHARDGEN, "--dest", str(dest)], tmp_path, fsize=64 * 1024, env={"TMPDIR": str(staging)})
    line = one_line_error(done, "shardgen")
    assert f"cannot write the staging files under {staging}/shardgen-" in line and "File too large" in line
    assert "set TMPDIR" in line
    assert list(staging.iterdir()) == [], "the staging directory is removed"
    assert not (dest / MANIFEST_NAME).exists()
    assert [p.name for p in dest.rglob("*") if p.name.startswith(".")] == [] if dest.exists() else True


def test_shardgen_destination_full(tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Staging has room, the destination has none: the copy into it fails with ENOSPC."""
    import feedrate.storage
    from shardgen.__main__ import main

    real_copy = feedrate.storage.shutil.copyfile
    dest = tmp_path / "ds"

    def full(src: str, dst: str, *args: object, **kwargs: object) -> object:
        if str(dst).startswith(str(dest)):
            with open(dst, "wb") as f:
                f.write(b"partial")  # some bytes got there before the disk filled
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(feedrate.storage.shutil, "copyfile", full)
    with pytest.raises(SystemExit) as info:
        main(["--dest", str(dest), *SHARDGEN[2:]])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"shardgen: error: cannot write {dest / 'train-000000.tar'}: No space left"), err
    assert not (dest / MANIFEST_NAME).exists()
    assert [p.name for p in dest.iterdir()] == [], "the partial file was removed"
