"""Every importable loader through a short ResNet-50 AMP run on one GPU, summed up in one table.

Run through scripts/gpu_check.sh, which finds the Python, installs what is missing from WHEELS_DIR and
sets PYTHONPATH; this part needs only the standard library and the project (it must run under whatever
Python the GPU node has, with no virtual environment). Settings come from the environment:

    GPU_CHECK_DIR  logs, runs, data, table   (default results/gpu_check)
    DEVICE         cuda | cpu                (default cuda; cpu for a rehearsal on a laptop)
    LOADERS        comma-separated names     (default: every loader feedrate knows)
    SAMPLES, TEST_SAMPLES, SHARD_SIZE, FORMAT  the synthetic dataset (default 12800, 2560, 1280, jpg)
    EPOCHS, BATCH, WORKERS, MAX_BATCHES, ARCH  the train.py runs (default 2, 256, min(8, cores), 50,
                                               resnet50)
    BUDGET_S       seconds for all runs together; a run never starts past it (default 300)
    DRY_RUN=1      print the plan and the commands, run nothing

The figures in the table are the last epoch's (the first one pays for cuDNN's autotuning and warm-up):
img/s, the fraction of wall time spent waiting on the loader, and AU = compute / wall time with the first
batch excluded. A loader that cannot run here gets a row saying why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FORMATS = ("jpg", "png", "raw")
DEVICES = ("cuda", "cpu")
RUN_TIMEOUT_S = 150  # one train.py run; with BUDGET_S this keeps the whole check under 6 minutes


class CheckError(Exception):
    """A setting or an environment the check cannot work with."""


@dataclass(frozen=True)
class Config:
    out: Path
    device: str = "cuda"
    loaders: tuple[str, ...] = ()
    samples: int = 12_800
    test_samples: int = 2_560
    shard_size: int = 1_280
    fmt: str = "jpg"
    epochs: int = 2
    batch: int = 256
    workers: int = 8
    max_batches: int = 50
    arch: str = "resnet50"
    budget_s: float = 300.0
    dry_run: bool = False

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise CheckError(f"DEVICE={self.device!r}; accepted: {', '.join(DEVICES)}")
        if self.fmt not in FORMATS:
            raise CheckError(f"FORMAT={self.fmt!r}; accepted: {', '.join(FORMATS)}")
        for name in ("samples", "test_samples", "shard_size", "epochs", "batch", "max_batches", "budget_s"):
            if getattr(self, name) <= 0:
                raise CheckError(f"{name.upper()}={getattr(self, name)} must be > 0")
        if self.workers < 0:
            raise CheckError(f"WORKERS={self.workers} must be >= 0")

    @classmethod
    def from_env(cls, env: dict[str, str]) -> Config:
        def number(key: str, default: float, kind: type = int) -> Any:
            text = env.get(key, "").strip()
            if not text:
                return default
            try:
                return kind(text)
            except ValueError:
                raise CheckError(f"{key}={text!r} is not a number") from None

        names = tuple(n.strip() for n in env.get("LOADERS", "").split(",") if n.strip())
        return cls(
            out=Path(env.get("GPU_CHECK_DIR") or "results/gpu_check"),
            device=env.get("DEVICE", "cuda").strip() or "cuda",
            loaders=names,
            samples=number("SAMPLES", cls.samples),
            test_samples=number("TEST_SAMPLES", cls.test_samples),
            shard_size=number("SHARD_SIZE", cls.shard_size),
            fmt=env.get("FORMAT", cls.fmt).strip() or cls.fmt,
            epochs=number("EPOCHS", cls.epochs),
            batch=number("BATCH", cls.batch),
            workers=number("WORKERS", min(8, os.cpu_count() or 1)),
            max_batches=number("MAX_BATCHES", cls.max_batches),
            arch=env.get("ARCH", cls.arch).strip() or cls.arch,
            budget_s=number("BUDGET_S", cls.budget_s, float),
            dry_run=env.get("DRY_RUN", "") not in ("", "0"),
        )


@dataclass
class Row:
    loader: str
    decode: str = "-"
    img_per_s: float | None = None
    data_wait: float | None = None
    au: float | None = None
    status: str = "ok"  # ok | skipped | failed | timeout
    note: str = ""
    seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def probe(name: str, device: str | None) -> str | None:
    """Why loader `name` cannot run on `device` here (loaders.unavailable, with its imports tried), or
    None. `device=None` checks the packages only: a dry run shows the plan for the GPU node even on a
    laptop without one. An unknown name gets a row saying so rather than stopping the whole check."""
    sys.path.insert(0, str(ROOT))
    import loaders
    from feedrate.errors import FeedrateError

    try:
        return loaders.unavailable(name, device or "cpu", imports=True)
    except FeedrateError as exc:
        return str(exc)


def dataset_command(cfg: Config, dest: Path) -> list[str]:
    return [
        sys.executable, "-m", "shardgen", "--dest", str(dest), "--format", cfg.fmt, "--source", "synthetic",
        "--synthetic-train", str(cfg.samples), "--synthetic-test", str(cfg.test_samples),
        "--shard-size", str(cfg.shard_size), "--no-download",
    ]  # fmt: skip


def train_command(cfg: Config, name: str, data: Path) -> list[str]:
    return [
        sys.executable, str(ROOT / "train.py"), "--loader", name, "--data", str(data),
        "--epochs", str(cfg.epochs), "--batch-size", str(cfg.batch), "--workers", str(cfg.workers),
        "--device", cfg.device, "--out", str(cfg.out / "runs" / name), "--max-batches", str(cfg.max_batches),
        "--arch", cfg.arch, "--overwrite",
    ]  # fmt: skip


def last_error_line(log: Path) -> str:
    """The line a failed command left to explain itself (train.py's one-line `error:`), else its last."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    for line in reversed(lines):
        if "error:" in line or "Error" in line:
            return line[:300]
    return lines[-1][:300] if lines else ""


def read_run(run_dir: Path, row: Row) -> Row:
    """Fill `row` from run.json: the last epoch's training figures and the decode device."""
    doc = json.loads((run_dir / "run.json").read_text())
    row.decode = str(doc.get("loader", {}).get("decode_device") or "-")
    epochs = doc.get("epochs") or []
    figures = epochs[-1]["train"] if epochs else doc.get("summary", {})
    row.img_per_s = figures.get("img_per_s")
    row.data_wait = figures.get("data_wait_fraction")
    row.au = figures.get("au")
    row.extra = {
        "epochs": len(epochs),
        "status": doc.get("status"),
        "device": doc.get("device", {}).get("name"),
    }
    if doc.get("status") != "complete":
        row.status, row.note = "failed", f"run.json status {doc.get('status')!r}"
    return row


def run_loader(cfg: Config, name: str, data: Path, deadline: float) -> Row:
    row = Row(name)
    log = cfg.out / "logs" / f"{name}.log"
    left = deadline - time.monotonic()
    if left < 20:
        row.status, row.note = "skipped", f"time budget of {cfg.budget_s:.0f} s spent"
        return row
    t0 = time.monotonic()
    with open(log, "w") as out:
        try:
            proc = subprocess.run(
                train_command(cfg, name, data),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                timeout=min(RUN_TIMEOUT_S, left),
                env=os.environ | {"PYTHONUNBUFFERED": "1"},
            )
        except subprocess.TimeoutExpired:
            row.status, row.note = "timeout", f"stopped after {min(RUN_TIMEOUT_S, left):.0f} s; see {log}"
            return row
    row.seconds = time.monotonic() - t0
    if proc.returncode != 0:
        row.status, row.note = "failed", f"exit {proc.returncode}: {last_error_line(log)}"
        return row
    try:
        return read_run(cfg.out / "runs" / name, row)
    except (OSError, ValueError, KeyError, IndexError) as exc:
        row.status, row.note = "failed", f"unreadable run.json ({exc})"
        return row


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_table(rows: list[Row]) -> str:
    """One table: loader, decode device, img/s, data-wait fraction, AU, and a note when it did not run."""
    head = f"{'loader':12} {'decode':7} {'img/s':>9} {'data wait':>9} {'AU':>7}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        rate = "-" if r.img_per_s is None else f"{r.img_per_s:.0f}"
        note = r.note if r.status == "ok" or r.note.startswith(r.status) else f"{r.status}: {r.note}"
        lines.append(f"{r.loader:12} {r.decode:7} {rate:>9} {_pct(r.data_wait):>9} {_pct(r.au):>7}  {note}")
    return "\n".join(lines)


def main() -> int:
    cfg = Config.from_env(dict(os.environ))
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "logs").mkdir(exist_ok=True)
    sys.path.insert(0, str(ROOT))
    import loaders

    names = cfg.loaders or tuple(loaders.available())
    data = cfg.out / "data" / f"{cfg.fmt}-{cfg.samples}-{cfg.test_samples}-{cfg.shard_size}"
    print(f"gpu_check: {sys.executable} (Python {sys.version.split()[0]}), device {cfg.device}", flush=True)
    print(f"gpu_check: loaders {', '.join(names)}; dataset {data}; logs under {cfg.out}", flush=True)
    if cfg.dry_run:
        if not (data / "manifest.json").exists():
            print("would run: " + " ".join(dataset_command(cfg, data)))
        for name in names:
            reason = probe(name, None)
            print(
                f"{name}: skipped ({reason})"
                if reason
                else "would run: " + " ".join(train_command(cfg, name, data))
            )
        return 0

    t0 = time.monotonic()
    if not (data / "manifest.json").exists():
        log = cfg.out / "logs" / "shardgen.log"
        with open(log, "w") as out:
            done = subprocess.run(dataset_command(cfg, data), stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        if done.returncode != 0:
            raise CheckError(f"building the dataset failed: {last_error_line(log)} (log: {log})")
    print(f"gpu_check: dataset ready in {time.monotonic() - t0:.1f} s", flush=True)

    deadline = time.monotonic() + cfg.budget_s
    rows = []
    for name in names:
        reason = probe(name, cfg.device)
        if reason:
            row = Row(name, status="skipped", note=reason)
        else:
            print(f"gpu_check: {name} ...", flush=True)
            row = run_loader(cfg, name, data, deadline)
        print(f"gpu_check: {name}: {row.status} {row.note}".rstrip(), flush=True)
        rows.append(row)

    table = format_table(rows)
    amp = "AMP" if cfg.device == "cuda" else "float32"
    print(f"\n{cfg.arch} on {cfg.device} ({amp}), {cfg.fmt}, batch {cfg.batch}, workers {cfg.workers}, "
          f"last of {cfg.epochs} epochs of up to {cfg.max_batches} batches:")  # fmt: skip
    print(table, flush=True)
    (cfg.out / "table.txt").write_text(table + "\n")
    summary = {"config": asdict(cfg) | {"out": str(cfg.out)}, "rows": [asdict(r) for r in rows]}
    (cfg.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if any(r.status in ("failed", "timeout") for r in rows) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CheckError as exc:
        print(f"gpu_check: error: {exc}", file=sys.stderr)
        sys.exit(2)
