"""The toolkit every loader backend shares (loaders.availability, options, stats, seeds, devices, local
copies), exercised through the real backends: real shards from shardgen, the real local S3 server, GETs
counted at that server."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import loaders
from feedrate.errors import FeedrateError

REPO = Path(__file__).resolve().parents[1]


# -- loaders.unavailable: can this backend run here? -------------------------------------------------------
def test_the_probe_says_why_dali_mixed_decode_cannot_run_without_a_gpu() -> None:
    import torch

    reason = loaders.unavailable("dali", "cuda")
    if torch.cuda.is_available():
        assert reason is None or "needs the package" in reason
    else:
        assert reason is not None and reason.startswith("DALI mixed (nvJPEG) decode needs a CUDA GPU; ")
    assert loaders.unavailable("dali", "cpu") == (
        None if importlib.util.find_spec("nvidia.dali") else loaders.unavailable("dali", "cuda")
    )


def test_the_gpu_reason_names_the_role_of_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    import loaders.availability as availability

    monkeypatch.setattr(availability, "_no_gpu", lambda: "no NVIDIA driver on this machine")
    reason = loaders.unavailable("dali", "cuda")
    assert reason is not None and reason.startswith("DALI mixed (nvJPEG) decode needs a CUDA GPU")
    assert "no NVIDIA driver" in reason
    assert loaders.unavailable("tensor", "cuda:1") == (
        "loader 'tensor' on cuda:1 needs a CUDA GPU; no NVIDIA driver on this machine"
    )


def test_the_probe_names_a_missing_package_before_asking_for_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import loaders.availability as availability

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda m, *a: None if m == "nvidia.dali" else real(m, *a)
    )
    monkeypatch.setattr(availability, "_no_gpu", lambda: pytest.fail("a missing package needs no GPU check"))
    assert loaders.unavailable("dali", "cuda") == (
        "loader 'dali' needs the package that provides 'nvidia.dali': pip install nvidia-dali-cuda120"
    )
    assert loaders.unavailable("torchvision") is None


def test_the_probe_imports_nothing_heavy_for_the_cpu() -> None:
    code = (
        "import sys, loaders\n"
        "print([loaders.unavailable(n) for n in loaders.BACKENDS])\n"
        "print(sorted(m for m in ('torch', 'nvidia.dali', 'torchvision') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "[]"


def test_the_probe_rejects_an_unknown_loader_or_device() -> None:
    accepted = "accepted: torchvision, wds, dali, tensor"
    with pytest.raises(FeedrateError, match=rf"unknown loader 'ffcv'; {accepted}"):
        loaders.unavailable("ffcv")
    with pytest.raises(FeedrateError, match=r"unknown device 'tpu'; accepted: cpu, cuda, cuda:N"):
        loaders.unavailable("wds", "tpu")
