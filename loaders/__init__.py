"""Loaders by name. Each backend's heavy dependency is imported only when that backend is asked for.

`make_loader("dali", cfg)` on a machine without DALI raises a FeedrateError that says what to install;
`import loaders` itself needs nothing beyond the standard library and feedrate;
`unavailable(name, device)` says why a backend cannot run here without importing it.
"""

from __future__ import annotations

import importlib

from feedrate.errors import FeedrateError
from loaders.availability import BACKENDS, unavailable
from loaders.base import CIFAR10_MEAN, CIFAR10_STD, Download, Loader, LoaderConfig, batches_for


def available() -> list[str]:
    return list(BACKENDS)


def make_loader(name: str, cfg: LoaderConfig) -> Loader:
    """The loader called `name` for `cfg`; unknown names and missing packages are FeedrateErrors."""
    if name not in BACKENDS:
        raise FeedrateError(f"unknown loader {name!r}; accepted: {', '.join(BACKENDS)}")
    module_name, class_name, packages = BACKENDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # the one wording of "what to install" is availability's; this is its fallback for a module
        # that availability does not list
        why = unavailable(name, imports=True)
        raise FeedrateError(
            why or f"loader {name!r} needs the package that provides {exc.name!r}: pip install {packages}"
        ) from None
    return getattr(module, class_name)(cfg)


__all__ = [
    "BACKENDS",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "Download",
    "Loader",
    "LoaderConfig",
    "available",
    "batches_for",
    "make_loader",
    "unavailable",
]
