"""`make bench`: loader-only throughput of every variant, side by side, in one run.

Variants are loader x storage x encoding x workers (x network for remote storage). The torchvision
loader on local disk with the same workers, measured in the same run, is the baseline of every ratio.
Remote variants read `s3://` and `cos://` URLs from a local S3 endpoint (moto's server on 127.0.0.1)
that the bench starts and stops itself; GET requests are counted at that server (GETs/shard/epoch:
shard GETs over shards x epochs begun; remote wds readers may also have read ahead into the next
epoch, so up to one epoch more shows).

`--net PRESET[,PRESET...]` (`make bench NET=same-region`; `all` for every preset): remote variants then
read through the shaping proxy (rig.netproxy) set to each preset in turn -- first-byte latency,
jitter, per-connection and shared bandwidth of a real object store -- and each remote row gets its
ratio to the same loader on local disk (`ratio_to_local`). The loaders are not told the preset: they
plan their prefetching from what they measure (their choice is in each row's `prefetch_plan`). Without
`--net`, remote variants talk to the endpoint directly (network "loopback").

The baseline is measured first and again last; ratios are to the mean of the two passes, and a run
whose passes differ by more than 15% carries a warning (bench.baseline). Every row also reports the CPU
time of its process tree per image (`cpu_us_per_img`, bench.cpu), which a noisy neighbour hardly moves.
With `--peers` (the default; local storage) other libraries' own data paths over the same shards are
measured as reference rows (`peer:dali-plain`, `peer:webdataset`: bench.peers), and bench.md sets each
feedrate loader beside its peer.

Each variant runs in a fresh process (`bench.measure`); one that cannot run here (a GPU-only variant
without a GPU, a missing package) is listed as skipped with its reason.

Writes results/bench/bench.json (the bench JSON contract's fields, plus details) and
results/bench/bench.md, and prints the table. This module is the command line only: the variants are
bench.variants', a run is bench.sweep's, the tables bench.tables'.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench.baseline import describe
from bench.cli import SHAPED, parse_ints, parse_list, parse_nets
from bench.measure import REPEATS
from bench.sweep import sweep
from bench.tables import net_table, peer_table, table
from bench.variants import LOADERS, STORAGES
from feedrate import network
from feedrate.errors import CliParser, FeedrateError, run_cli
from feedrate.files import atomic_write_bytes
from feedrate.manifest import ENCODINGS


def get_args_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="bench", description="Loader-only throughput of every variant.")
    p.add_argument("--loaders", default=",".join(LOADERS), help="comma-separated (default: all)")
    p.add_argument("--storage", default=",".join(STORAGES), help="comma-separated: local,s3,cos")
    p.add_argument("--formats", default=",".join(ENCODINGS), help="comma-separated: jpg,png,raw")
    p.add_argument("--workers", default="2", help="comma-separated worker counts (default: 2)")
    p.add_argument(
        "--net",
        default="",
        help="network presets for remote storage, comma-separated or 'all' (default: none, unshaped): "
        + ", ".join(SHAPED),
    )
    p.add_argument(
        "--peers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure other libraries' data paths over the local shards (peer:dali-plain, "
        "peer:webdataset) as reference rows (default: on; needs local in --storage)",
    )
    p.add_argument("--samples", type=int, default=20_000, help="images per timed pass")
    p.add_argument("--train-size", type=int, default=20_000, help="samples in each bench dataset")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--repeats", type=int, default=REPEATS, help=f"timed passes per variant, median counts ({REPEATS})"
    )
    p.add_argument("--warmup", type=int, default=5, help="batches before timing")
    p.add_argument("--timeout", type=int, default=600, help="seconds per variant")
    p.add_argument("--data-dir", default="data/bench")
    p.add_argument("--out", default="results/bench")
    return p


def main(argv: list[str] | None = None) -> None:
    run_cli("bench", lambda: _run(get_args_parser().parse_args(argv)))


def _run(args: argparse.Namespace) -> None:
    args.loaders = parse_list(args.loaders, LOADERS, "loader")
    args.storage = parse_list(args.storage, STORAGES, "storage")
    args.formats = parse_list(args.formats, ENCODINGS, "format")
    args.net = parse_nets(args.net)
    if args.net and args.storage == ["local"]:
        raise FeedrateError("--net shapes remote storage; add s3 or cos to --storage")
    args.workers = parse_ints(args.workers, "--workers", 0)
    for name in ("samples", "train_size", "batch_size", "repeats"):
        if getattr(args, name) < 1:
            raise FeedrateError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    document = sweep(args)
    document["config"]["wall_s"] = round(time.perf_counter() - started, 1)
    text = describe(document["baseline"]) + "\n" + table(document["results"])
    by_peer = peer_table(document["results"])
    if by_peer:
        text += (
            "\n## feedrate against the peers (same shards, local, CPU; img/s over the peer's)\n\n" + by_peer
        )
    by_net = net_table(document["results"])
    if by_net:
        text += (
            "\n## Remote / local throughput per network (set-up time incl. any up-front copy; the share "
            "of the CPUs the emulated endpoint - S3 server and shaping proxy - took meanwhile)\n\n"
            + "".join(f"- {network.preset(n).describe()}\n" for n in args.net)
            + "\n"
            + by_net
        )
    atomic_write_bytes(out / "bench.json", (json.dumps(document, indent=2) + "\n").encode())
    atomic_write_bytes(
        out / "bench.md",
        (
            "# Loader-only throughput\n\n"
            f"{document['machine'].get('cpu_count')} CPUs, batch {args.batch_size}, "
            f"{args.samples} images per pass, median of {args.repeats}; ratios to the torchvision "
            "baseline (local, same workers) measured first and last in this run, against the mean of the "
            "two; CPU µs/img: user + system time of the variant's process tree over its timed passes.\n"
            + _code_line(document.get("code") or {})
            + "\n"
            + text
        ).encode(),
    )
    if document["baseline"]["flagged"]:
        print("bench: warning: the baseline was unsteady in this run (see bench.md)", file=sys.stderr)
    print(text)
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")


def _code_line(code: dict) -> str:
    """Which commit the figures are of, and whether the tree had local changes then."""
    if not code.get("commit"):
        return "Code: not a git checkout.\n"
    dirty = " with local changes" if code.get("dirty") else ""
    return f"Code: commit {code['commit'][:12]}{dirty}.\n"


if __name__ == "__main__":
    main()
