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
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from feedrate import network
from feedrate.errors import FeedrateError, run_cli
from loaders import BACKENDS
from rig import locals3

REPO = Path(__file__).resolve().parents[1]
CPU_SWEEP = (1_000.0, 3_000.0, 10_000.0, 30_000.0, 100_000.0)
BUCKET = "feedrate-compare"


def parse_nets(text: str) -> list[str]:
    """`all` | comma-separated shaped presets | "" -> the presets to train through."""
    shaped = [n for n in network.PRESETS if n != "loopback"]
    if not text:
        return []
    if text == "all":
        return shaped
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in shaped]
    if bad or not names:
        raise FeedrateError(
            f"unknown network preset {', '.join(bad) or '(none)'}; accepted: {', '.join(shaped)}"
        )
    return names


@contextlib.contextmanager
def shaped_s3(data: str, out: Path) -> Iterator[tuple[str, dict[str, str], object]]:
    """The local dataset `data` copied to a local S3 endpoint with a shaping proxy in front:
    (its s3:// URL, the environment that points the SDKs at the proxy, the proxy)."""
    from bench.__main__ import upload
    from rig.netproxy import NetProxy

    root = Path(data)
    if not (root / "manifest.json").exists():
        raise FeedrateError(f"--net needs a local dataset to copy to S3; {data} has no manifest.json")
    server = locals3.start(log_path=out / "moto.log")
    proxy = None
    saved = dict(os.environ)
    try:
        os.environ.update(server.env())
        locals3.create_bucket(server.endpoint, BUCKET)
        url = f"s3://{BUCKET}/{root.name}"
        upload(root, url)
        proxy = NetProxy(server.endpoint, seed=0, record=False).start()
        env = {
            **os.environ,
            **server.env(),
            "AWS_ENDPOINT_URL": proxy.endpoint,
            "COS_ENDPOINT": proxy.endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        yield url, env, proxy
    finally:
        os.environ.clear()
        os.environ.update(saved)
        if proxy is not None:
            proxy.close()
        locals3.stop(server.pid)


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
    p.add_argument("--net", default="", help="also train from S3 through these network presets (or 'all')")
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
        nets = parse_nets(args.net)
        if rates != [None] and args.emulate == "auto":
            print(
                "compare: no GPU - sweeping emulated accelerator rates " + ", ".join(f"{r:g}" for r in rates)
            )
        out = args.out or REPO / "results" / "compare" / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out.mkdir(parents=True, exist_ok=True)
        failed: list[str] = []
        with contextlib.ExitStack() as stack:
            remote = stack.enter_context(shaped_s3(args.data, out)) if nets else None
            for name in names:
                for rate in rates:
                    _run(args, name, rate, None, out, failed, None)
                    for net in nets:
                        _run(args, name, rate, net, out, failed, remote)
        from report.__main__ import build_report

        files = build_report([out], out)
        print((out / "summary.md").read_text())
        if failed:
            print("compare: these variants did not finish: " + ", ".join(failed), file=sys.stderr)
        print("compare: wrote " + ", ".join(str(f) for f in files))

    run_cli("compare", body)


def _run(
    args: argparse.Namespace,
    name: str,
    rate: float | None,
    net: str | None,
    out: Path,
    failed: list[str],
    remote: tuple[str, dict[str, str], object] | None,
) -> None:
    """One train.py run: local data, or (`net`) the S3 copy through the proxy shaped as `net`."""
    label = name + (f"-{net}" if net else "") + ("" if rate is None else f"-emu{rate:g}")
    run_dir = out / label
    data, env = args.data, None
    if net and remote is not None:
        data, env, proxy = remote
        proxy.link = network.preset(net)  # type: ignore[attr-defined]
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
