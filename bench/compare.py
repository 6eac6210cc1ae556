"""`make compare`: train.py over several loader variants, then the report over all of them.

With a GPU the variants train ResNet-50. Without one, ResNet-50 on two CPU cores runs at tens of images
per second and every loader keeps up, which says nothing about loaders; so by default (`--emulate auto`)
a CPU machine sweeps emulated accelerator rates instead (each step sleeps batch/RATE, as MLPerf Storage's
DLIO does) and the report names, per loader, the highest rate it feeds at AU >= 90%. `--emulate none`
forces the real model anywhere; `--emulate 2000,8000` picks the rates.

`--net PRESET[,PRESET...]` (`make compare NET=same-region`; `all` for every preset): each variant also
trains from S3 -- the dataset copied to a local S3 endpoint (moto's server on 127.0.0.1), read through
the shaping proxy (rig.netproxy) set to the preset, with `train.py --net PRESET` so the loaders
size their prefetching for that link -- and the report sets each remote run's AU beside the same
variant's on local disk.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from bench.cli import parse_list, parse_nets
from feedrate import network
from feedrate.errors import CliParser, FeedrateError, run_cli
from loaders import BACKENDS
from rig.endpoint import LocalEndpoint, local_endpoint

REPO = Path(__file__).resolve().parents[1]
CPU_SWEEP = (1_000.0, 3_000.0, 10_000.0, 30_000.0, 100_000.0)
BUCKET = "feedrate-compare"


@contextlib.contextmanager
def shaped_s3(data: str, out: Path) -> Iterator[tuple[str, LocalEndpoint]]:
    """The local dataset `data` copied to a local S3 endpoint with a shaping proxy in front (in this
    process, re-shaped per run): (its s3:// URL, the endpoint)."""
    from bench.datasets import upload

    root = Path(data)
    if not (root / "manifest.json").exists():
        raise FeedrateError(f"--net needs a local dataset to copy to S3; {data} has no manifest.json")
    with local_endpoint(BUCKET, out, proxy="thread") as local:
        url = f"s3://{BUCKET}/{root.name}"
        with local.direct():  # set-up: straight to the server, unshaped
            upload(root, url)
        yield url, local


def parse_emulate(text: str) -> list[float | None] | None:
    """`--emulate`: `auto` -> None (decided by the device: the real model on a GPU, CPU_SWEEP without
    one), `none` -> [None] (the real model anywhere), comma-separated positive img/s rates -> them."""
    if text == "auto":
        return None
    if text == "none":
        return [None]
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise FeedrateError(
            f"--emulate {text!r}: expected auto, none or comma-separated img/s rates"
        ) from None
    if not rates or any(not r > 0 or r == float("inf") for r in rates):
        raise FeedrateError(f"--emulate {text!r}: rates must be positive, finite numbers of img/s")
    return list(rates)


def sweep_rates(emulate: list[float | None] | None, cuda: bool) -> list[float | None]:
    """The rates to run: `parse_emulate`'s choice, `auto` resolved for this machine."""
    if emulate is not None:
        return emulate
    return [None] if cuda else list(CPU_SWEEP)


def get_args_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="compare", description=__doc__)
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
    p.add_argument("--net", default="", help="also train from S3 through these network presets (or 'all')")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked before anything runs: `loaders`, `nets` and `rates` (auto: None) become
    lists; a bad value is a one-line FeedrateError naming it and what is accepted."""
    args = get_args_parser().parse_args(argv)
    args.loaders = parse_list(args.loaders, tuple(BACKENDS), "loader")
    args.nets = parse_nets(args.net)
    args.rates = parse_emulate(args.emulate)
    if args.epochs < 1:
        raise FeedrateError(f"--epochs {args.epochs} must be >= 1")
    if args.workers < 0:
        raise FeedrateError(f"--workers {args.workers} must be >= 0")
    if args.max_batches is not None and args.max_batches < 1:
        raise FeedrateError(f"--max-batches {args.max_batches} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    run_cli("compare", lambda: _compare(parse_args(argv)))


def _compare(args: argparse.Namespace) -> None:
    import torch

    cuda = torch.cuda.is_available() and args.device != "cpu"
    rates = sweep_rates(args.rates, cuda)
    if args.rates is None and rates != [None]:
        print("compare: no GPU - sweeping emulated accelerator rates " + ", ".join(f"{r:g}" for r in rates))
    out = args.out or REPO / "results" / "compare" / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    with contextlib.ExitStack() as stack:
        remote = stack.enter_context(shaped_s3(args.data, out)) if args.nets else None
        for name in args.loaders:
            for rate in rates:
                _run(args, name, rate, None, out, failed, None)
                for net in args.nets:
                    _run(args, name, rate, net, out, failed, remote)
    from report.__main__ import build_report

    files = build_report([out], out)
    print((out / "summary.md").read_text())
    if failed:
        print("compare: these variants did not finish: " + ", ".join(failed), file=sys.stderr)
    print("compare: wrote " + ", ".join(str(f) for f in files))


def _run(
    args: argparse.Namespace,
    name: str,
    rate: float | None,
    net: str | None,
    out: Path,
    failed: list[str],
    remote: tuple[str, LocalEndpoint] | None,
) -> None:
    """One train.py run: local data, or (`net`) the S3 copy through the proxy shaped as `net`."""
    label = name + (f"-{net}" if net else "") + ("" if rate is None else f"-emu{rate:g}")
    run_dir = out / label
    data, env = args.data, None
    if net and remote is not None:
        data, local = remote
        assert local.proxy is not None, "shaped_s3 always puts a proxy in front"
        local.proxy.link = network.preset(net)
        env = local.environ()
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        "--loader", name,
        "--data", data,
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
    if net:
        cmd += ["--net", net]
    cmd += args.train_args.split()
    print(f"compare: {label}", flush=True)
    done = subprocess.run(cmd, cwd=REPO, env=env, check=False)
    if done.returncode != 0:
        failed.append(f"{label} (exit {done.returncode})")


if __name__ == "__main__":
    main()
