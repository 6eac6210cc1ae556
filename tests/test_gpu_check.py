"""scripts/gpu_check.sh (and its Python half, scripts/gpu_check.py): what can be checked without a GPU -
installing from wheels, skipping a loader that does not import, the table read from run.json, settings
validated - and, marked slow, the whole check rehearsed on the CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import needs_dali

REPO = Path(__file__).resolve().parent.parent


def gpu_check_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def wheel_of(package: str, dest: Path) -> Path:
    """A wheel rebuilt from an installed pure-Python package (its files and its dist-info)."""
    import importlib.metadata
    import zipfile

    dist = importlib.metadata.distribution(package)
    name = f"{package}-{dist.version}-py3-none-any.whl"
    with zipfile.ZipFile(dest / name, "w") as zf:
        for file in dist.files or []:
            path = Path(str(dist.locate_file(file)))
            if path.is_file() and "__pycache__" not in file.parts:
                zf.write(path, str(file))
    return dest / name


def test_gpu_check_installs_from_wheels_and_skips_a_loader_that_does_not_import(tmp_path: Path) -> None:
    blockers = tmp_path / "blockers"
    (blockers / "nvidia").mkdir(parents=True)
    (blockers / "nvidia" / "__init__.py").write_text("raise ImportError('no DALI on this node')\n")
    (blockers / "braceexpand.py").write_text("raise ImportError('not installed')\n")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel_of("braceexpand", wheels)
    env = {
        "PATH": os.environ["PATH"],
        "PYTHON": sys.executable,
        "PYTHONPATH": str(blockers),
        "WHEELS_DIR": str(wheels),
        "GPU_CHECK_DIR": str(tmp_path / "check"),
        "DRY_RUN": "1",
        "LOADERS": "torchvision,dali",
    }
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "installed braceexpand from" in done.stdout
    assert "no usable wheel for nvidia-dali-cuda120" in done.stdout
    assert (tmp_path / "check" / "site" / "braceexpand").exists()
    assert "dali: skipped (nvidia.dali does not import (ImportError: no DALI on this node)" in done.stdout
    assert "-m shardgen --dest" in done.stdout
    assert re.search(
        r"would run: \S+ \S+/train.py --loader torchvision .*--device cuda .*--max-batches 50", done.stdout
    )


def test_gpu_check_refuses_a_python_without_torch(tmp_path: Path) -> None:
    fake = tmp_path / "python3"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "PYTHON": str(fake), "GPU_CHECK_DIR": str(tmp_path / "check")}
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "cannot import torch and torchvision" in done.stderr


def test_gpu_check_table_comes_from_run_json(tmp_path: Path) -> None:
    gc = gpu_check_module()
    run = tmp_path / "dali"
    run.mkdir()
    epoch = {"img_per_s": 20000.0, "data_wait_fraction": 0.012, "au": 0.987}
    doc = {
        "status": "complete",
        "loader": {"name": "dali", "decode_device": "mixed"},
        "device": {"name": "NVIDIA H100"},
        "epochs": [{"train": {"img_per_s": 1.0}}, {"train": epoch}],
        "summary": {"img_per_s": 5.0},
    }
    (run / "run.json").write_text(json.dumps(doc))
    row = gc.read_run(run, gc.Row("dali"))
    assert (row.decode, row.img_per_s, row.data_wait, row.au, row.status) == (
        "mixed",
        20000.0,
        0.012,
        0.987,
        "ok",
    )
    note = "loader 'tensor' needs the package that provides 'torch': pip install torch"
    table = gc.format_table([row, gc.Row("tensor", status="skipped", note=note)])
    assert re.search(r"dali\s+mixed\s+20000\s+1\.2%\s+98\.7%", table)
    assert re.search(r"tensor\s+-\s+-\s+-\s+-\s+skipped: " + re.escape(note), table)
    (run / "run.json").write_text(json.dumps(doc | {"status": "interrupted"}))
    assert gc.read_run(run, gc.Row("dali")).status == "failed"


def test_gpu_check_settings_are_validated() -> None:
    gc = gpu_check_module()
    cfg = gc.Config.from_env({"LOADERS": "dali, torchvision", "SAMPLES": "512", "DEVICE": "cpu"})
    assert (cfg.loaders, cfg.samples, cfg.device) == (("dali", "torchvision"), 512, "cpu")
    with pytest.raises(gc.CheckError, match="DEVICE='tpu'; accepted: cuda, cpu"):
        gc.Config.from_env({"DEVICE": "tpu"})
    with pytest.raises(gc.CheckError, match="EPOCHS='two' is not a number"):
        gc.Config.from_env({"EPOCHS": "two"})


@pytest.mark.slow
@needs_dali
def test_gpu_check_rehearsal_on_the_cpu(tmp_path: Path) -> None:
    """The whole check, shrunk to CPU size: dataset, train.py per loader, the table."""
    settings = (
        "DEVICE=cpu SAMPLES=256 TEST_SAMPLES=64 SHARD_SIZE=64 BATCH=32 EPOCHS=2 MAX_BATCHES=2 ARCH=small"
    )
    env = dict(os.environ) | dict(kv.split("=") for kv in settings.split())
    env |= {
        "PYTHON": sys.executable,
        "GPU_CHECK_DIR": str(tmp_path),
        "LOADERS": "torchvision,dali",
        "WORKERS": "1",
    }
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    table = (tmp_path / "table.txt").read_text()
    assert re.search(r"torchvision\s+cpu\s+\d+\s+[\d.]+%\s+[\d.]+%", table), table
    assert re.search(r"dali\s+cpu\s+\d+\s+[\d.]+%\s+[\d.]+%", table), table
