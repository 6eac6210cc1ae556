"""Can a backend run here? One answer for the bench, the GPU check, the tests and the loaders themselves.

`unavailable(name, device)` returns the reason a loader cannot run on `device` on this machine, or None.
By default it only asks `importlib.util.find_spec` whether each package the backend needs is installed
(nothing is imported, so it is cheap enough for test collection and for planning a bench), and, for a
CUDA device, whether a GPU is there. `imports=True` goes further and imports the backend and the
packages it loads later: a GPU node with a DALI wheel built for another CUDA installs fine but fails
to import, and a check that runs for minutes should find that out before it starts.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from feedrate.errors import FeedrateError

# name -> (module, class, pip packages that backend needs)
BACKENDS: dict[str, tuple[str, str, str]] = {
    "torchvision": ("loaders.baseline", "TorchvisionLoader", "torch torchvision pillow"),
    "wds": ("loaders.streaming", "WdsLoader", "torch torchvision"),
    "dali": ("loaders.dali_pipe", "DaliLoader", "nvidia-dali-cuda120"),
    "tensor": ("loaders.resident", "TensorLoader", "torch"),
}

# name -> the modules the backend needs (find_spec names) and what installs them
REQUIRES: dict[str, tuple[tuple[str, ...], str]] = {
    "torchvision": (("torch", "torchvision", "PIL"), "torch torchvision pillow"),
    "wds": (("torch", "torchvision"), "torch torchvision"),
    "dali": (("torch", "nvidia.dali"), "nvidia-dali-cuda120"),
    "tensor": (("torch",), "torch"),
}
# Modules a backend imports only when a loader is built (checked with imports=True)
DEFERRED: dict[str, tuple[str, ...]] = {
    "dali": ("nvidia.dali", "nvidia.dali.plugin.pytorch", "loaders.dali_ops"),
}
DEVICE_TYPES = ("cpu", "cuda")
# What a CUDA device means for each backend (for the reason given when there is no GPU)
CUDA_ROLE = {"dali": "DALI mixed (nvJPEG) decode"}


def device_type(device: str) -> str:
    """ "cuda" for "cuda" / "cuda:1", "cpu" for "cpu"; any other device is a FeedrateError."""
    kind = device.split(":", 1)[0]
    if kind not in DEVICE_TYPES:
        raise FeedrateError(f"unknown device {device!r}; accepted: cpu, cuda, cuda:N")
    return kind


def _missing(name: str, module: str, packages: str, imports: bool) -> str | None:
    """Why `module` is not usable here (not installed; with `imports`, does not import), or None."""
    try:
        if imports:
            importlib.import_module(module)
            return None
        if importlib.util.find_spec(module) is not None:
            return None
    except (ImportError, OSError, ValueError) as exc:  # find_spec imports parent packages
        return f"{module} does not import ({type(exc).__name__}: {exc}); pip install {packages}"
    return f"loader {name!r} needs the package that provides {module!r}: pip install {packages}"


def _no_gpu() -> str | None:
    """Why torch cannot use a CUDA GPU here, or None when it can.

    On Linux a machine without the NVIDIA driver is told apart without importing torch."""
    if sys.platform.startswith("linux") and not (
        Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia").exists()
    ):
        return "no NVIDIA driver on this machine"
    import torch

    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU on this machine"
    return None


def unavailable(name: str, device: str = "cpu", *, imports: bool = False) -> str | None:
    """Why loader `name` cannot run on `device` here, or None when it can.

    An unknown loader name or device is a FeedrateError (a caller's mistake, not a fact about the machine).
    """
    if name not in BACKENDS:
        raise FeedrateError(f"unknown loader {name!r}; accepted: {', '.join(BACKENDS)}")
    kind = device_type(device)
    modules, packages = REQUIRES[name]
    # with `imports`, the backend's own module and what it loads later, so a broken install shows here
    checks = (*modules, BACKENDS[name][0], *DEFERRED.get(name, ())) if imports else modules
    for module in checks:
        why = _missing(name, module, packages, imports)
        if why is not None:
            return why
    if kind == "cuda":
        why = _no_gpu()
        if why is not None:
            return f"{CUDA_ROLE.get(name, f'loader {name!r} on {device}')} needs a CUDA GPU; {why}"
    return None
