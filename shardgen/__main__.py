"""`python -m shardgen`: the command line of shardgen."""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path

from feedrate.errors import CliParser, run_cli
from feedrate.manifest import ENCODINGS, SPLITS
from feedrate.storage import redact_url
from shardgen.pack import DEFAULT_SHARD_SIZE, ShardgenConfig, build


def get_args_parser() -> argparse.ArgumentParser:
    p = CliParser(
        prog="shardgen",
        description="Pack CIFAR-10 into WebDataset tar shards (+ DALI .idx) on local disk, S3 or COS.",
    )
    p.add_argument("--dest", required=True, help="dataset root: a path, file://, s3://B/P or cos://B/P")
    p.add_argument(
        "--source",
        default="auto",
        help="auto (real CIFAR-10, else synthetic with a warning), synthetic, or a path to "
        "cifar-10-python.tar.gz / a cifar-10-batches-py directory (default: auto)",
    )
    p.add_argument(
        "--format", dest="fmt", default="jpg", help=f"one of {', '.join(ENCODINGS)} (default: jpg)"
    )
    p.add_argument(
        "--shard-size",
        type=int,
        default=DEFAULT_SHARD_SIZE,
        help="samples per shard (default: %(default)s)",
    )
    p.add_argument("--splits", default=",".join(SPLITS), help="comma-separated (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="shuffle and synthetic-data seed (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a complete dataset at --dest")
    p.add_argument("--endpoint-url", default=None, help="S3/COS endpoint (default: from the environment)")
    p.add_argument(
        "--cache-dir", type=Path, default=Path("data"), help="where the CIFAR-10 download is cached"
    )
    p.add_argument("--synthetic-train", type=int, default=50_000, help="synthetic training samples")
    p.add_argument("--synthetic-test", type=int, default=10_000, help="synthetic test samples")
    p.add_argument(
        "--no-download",
        action="store_true",
        help="never download; auto uses the cache or synthetic",
    )
    return p


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM unwinds like Ctrl-C, so staging files are removed and no manifest is written.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    # First: from here on SIGTERM (docker stop, timeout, SLURM) unwinds like Ctrl-C. Before this line
    # nothing has been written, so the default action (exit) leaves nothing behind either.
    signal.signal(signal.SIGTERM, _terminate)

    def body() -> None:
        args = get_args_parser().parse_args(argv)
        cfg = ShardgenConfig(
            dest=args.dest,
            source=args.source,
            fmt=args.fmt,
            shard_size=args.shard_size,
            splits=tuple(s.strip() for s in args.splits.split(",") if s.strip()),
            seed=args.seed,
            overwrite=args.overwrite,
            endpoint_url=args.endpoint_url,
            cache_dir=args.cache_dir,
            synthetic_train=args.synthetic_train,
            synthetic_test=args.synthetic_test,
            allow_download=not args.no_download,
        )
        started = time.perf_counter()
        manifest = build(cfg)
        seconds = time.perf_counter() - started
        for split, entry in manifest.splits.items():
            sizes = [s.bytes for s in entry.shards]
            print(
                f"{split}: {entry.samples} samples in {len(sizes)} shards "
                f"({min(sizes) / 1e6:.2f}-{max(sizes) / 1e6:.2f} MB each, {sum(sizes) / 1e6:.1f} MB)"
            )
        where = redact_url(cfg.dest)
        print(f"wrote {manifest.kind} dataset ({manifest.encoding}) to {where} in {seconds:.1f} s")

    run_cli("shardgen", body)


if __name__ == "__main__":
    main()
