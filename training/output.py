"""The run's output directory: chosen and checked before anything is built, created only after.

Bad input must leave nothing behind, and a run that fails while its loaders are built (a missing split,
a wrong endpoint, a signal) must not leave an empty results directory either. So `output_dir` only
decides and checks (never creates), and `open_output` creates it once every rank's set-up succeeded.
Only rank 0 owns --out: it is the one process that writes results.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from feedrate.errors import FeedrateError
from training.results import CSV_NAME, RUN_JSON_NAME

RUNS_DIR = Path("results") / "runs"


def output_dir(out: Path | None, loader: str, overwrite: bool = False) -> Path:
    """`out`, checked; None: a fresh results/runs/<timestamp>-<loader> under the working directory.

    An existing non-empty `out` needs `overwrite`, so one run never mixes its rows into another's CSV.
    """
    if out is None:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = RUNS_DIR / f"{stamp}-{loader}"
        fresh, n = base, 1
        while fresh.exists():
            n += 1
            fresh = base.with_name(f"{base.name}-{n}")
        return fresh
    if out.exists() and not out.is_dir():
        raise FeedrateError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FeedrateError(f"--out {out} already exists; pass --overwrite or choose another directory")
    return out


def open_output(out: Path | None) -> None:
    """Create `out` and clear the files a run writes (rank 0; `out` is None on the others)."""
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    for name in (CSV_NAME, RUN_JSON_NAME):
        (out / name).unlink(missing_ok=True)
