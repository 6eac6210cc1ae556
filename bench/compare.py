"""`make compare`: train.py over several loader variants, then the report over all of them.

With a GPU the variants train ResNet-50. Without one, ResNet-50 on two CPU cores runs at tens of images
per second and every loader keeps up, which says nothing about loaders; so by default (`--emulate auto`)
a CPU machine sweeps emulated accelerator rates instead (each step sleeps batch/RATE, as MLPerf Storage's
DLIO does) and the report names, per loader, the highest rate it feeds at AU >= 90%. `--emulate none`
forces the real model anywhere; `--emulate 2000,8000` picks the rates.
"""

from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
from pathlib import Path

from feedrate.errors import FeedrateError, run_cli
from loaders import BACKENDS

REPO = Path(__file__).resolve().parents[1]
CPU_SWEEP = (1_000.0, 3_000.0, 10_000.0, 30_000.0, 100_000.0)


def parse_rates(text: str, cuda: bool) -> list[float | None]:
    """`auto` | `none` | comma-separated positive rates -> a list where None means the real model."""
    if text == "auto":
        return [None] if cuda else list(CPU_SWEEP)
    if text == "none":
        return [None]
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise FeedrateError(
            f"--emulate {text!r}: expected auto, none or comma-separated img/s rates"
        ) from None
    if not rates or any(r <= 0 for r in rates):
        raise FeedrateError(f"--emulate {text!r}: rates must be positive numbers")
    return list(rates)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="compare", description=__doc__)
    p.add_argument("--loaders", default=",".join(BACKENDS), help="comma-separated (default: all)")
    p.add_argument("--data", default="data/shards")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--emulate", default="auto", help="auto | none | RATE,RATE,... (images/s)")
    p.add_argument(
        "--max-batches", type=int, default=None, help="cap batches per epoch (default: 30 when emulating)"
    )
    p.add_argument("--out", type=Path, default=None, help="default: results/compare/<timestamp>")
    p.add_argument("--train-args", default="", help="extra train.py flags, e.g. '--arch small'")
    args = p.parse_args(argv)

    def body() -> None:
        import torch

        names = [n.strip() for n in args.loaders.split(",") if n.strip()]
        unknown = [n for n in names if n not in BACKENDS]
        if unknown or not names:
            raise FeedrateError(
                f"unknown loader {', '.join(unknown) or '(none)'}; accepted: {', '.join(BACKENDS)}"
            )
        cuda = torch.cuda.is_available() and args.device != "cpu"
        rates = parse_rates(args.emulate, cuda)
        if rates != [None] and args.emulate == "auto":
            print(
                "compare: no GPU - sweeping emulated accelerator rates " + ", ".join(f"{r:g}" for r in rates)
            )
        out = args.out or REPO / "results" / "compare" / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out.mkdir(parents=True, exist_ok=True)
        failed = []
        for name in names:
            for rate in rates:
                run_dir = out / (name if rate is None else f"{name}-emu{rate:g}")
                cmd = [
                    sys.executable,
                    str(REPO / "train.py"),
                    "--loader", name,
                    "--data", args.data,
                    "--epochs", str(args.epochs),
                    "--workers", str(args.workers),
                    "--device", args.device,
                    "--out", str(run_dir),
                    "--overwrite",
                ]  # fmt: skip
                max_batches = args.max_batches or (30 if rate is not None else None)
                if max_batches:
                    cmd += ["--max-batches", str(max_batches)]
                if rate is not None:
                    cmd += ["--emulate", f"{rate:g}"]
                cmd += args.train_args.split()
                print(f"compare: {run_dir.name}", flush=True)
                done = subprocess.run(cmd, cwd=REPO, check=False)
                if done.returncode != 0:
                    failed.append(f"{run_dir.name} (exit {done.returncode})")
        from report.__main__ import build_report

        files = build_report([out], out)
        print((out / "summary.md").read_text())
        if failed:
            print("compare: these variants did not finish: " + ", ".join(failed), file=sys.stderr)
        print("compare: wrote " + ", ".join(str(f) for f in files))

    run_cli("compare", body)


if __name__ == "__main__":
    main()
