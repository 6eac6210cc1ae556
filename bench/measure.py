"""Loader-only throughput of one variant, in its own process: `python -m bench.measure ...` prints JSON.

Each variant runs in a fresh process so that one loader's worker processes, thread pools and caches
cannot slow or speed up the next. The loader is built first (not timed: that is set-up, and a remote
fetch is reported in its own field), then iterated for `--warmup` batches, then timed over at least
`--samples` images (continuing into further epochs when the split is smaller), `--repeats` times. On
CUDA the clock is read after a synchronise, so asynchronous work is counted where it happens.

Besides the wall clock, the CPU time of the process tree (this process, its threads and the loader's
worker processes: bench.cpu) is read around the timed passes: CPU microseconds per image. So are the
loader's own stage counters (`stage_times()`, loaders.stagetimes) where it has them: CPU and wall
microseconds per image per stage over the same passes (`stages_cpu_us_per_img`, `stages_wall_us_per_img`;
None for a loader, or a peer, that reports no stages). A peer (`--loader peer:...`, bench.peers) is
measured by the same loop.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any

import torch

from bench.cpu import cpu_of, endpoint_pids, tree_cpu_s
from bench.peers import build_peer, is_peer
from feedrate.errors import CliParser, FeedrateError, run_cli
from loaders import LoaderConfig, make_loader
from loaders.stagetimes import Snapshot, stage_times
from training.device import resolve_device

# Timed passes per variant; the median counts. Measured on this shared 2-core machine (3 processes x 7
# passes of 20,000 images each for torchvision, wds and dali on raw): the median of any 3 of a process's
# 7 passes sat up to 17% / 15% / 21% (p90) from its 7-pass median, of any 5 up to 11% / 7.5% / 9%
# (p50: 1.3% / 0.4% / 0.3%; subsets of the same 7, so optimistic). 5 cuts the p90 error of 3 by a third
# to a half; 7 would add another 40% of timed passes (the default `make bench`, ~31 variants with
# peer:webdataset at 2-4k img/s, is estimated at ~10 minutes here with 5, ~12.5 with 7) for a median
# that 5 already matches to ~1% half the time. What no number of repeats fixes is the machine changing
# between variants (the three processes' medians differed by up to 2.6x): that is what the baseline's
# first and last passes and the CPU time per image are for.
REPEATS = 5


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    loader_name: str,
    data: str,
    *,
    batch_size: int,
    workers: int,
    samples: int,
    warmup: int,
    repeats: int,
    device: str,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Median img/s of `repeats` timed passes over >= `samples` training images (augmented), and the
    CPU time of the process tree over those passes per image."""
    # torch's CPU threads as train.py sets them (training.device's policy: the cores the loader's workers
    # leave, at least one): at torch's default of one thread per core beside two workers the tensor
    # loader cost 64 CPU us per image here instead of 11, which no training run would see.
    dev = resolve_device(device, workers)
    cfg = LoaderConfig(
        data=data,
        split="train",
        batch_size=batch_size,
        train=True,
        workers=workers,
        device=device,
        options=options or {},
    )
    t0 = time.perf_counter()
    if is_peer(loader_name):
        loader = build_peer(loader_name, data, batch_size=batch_size, workers=workers, device=device)
    else:
        loader = make_loader(loader_name, cfg)
    setup_s = time.perf_counter() - t0
    epoch = 0
    loader.set_epoch(epoch)
    iterator = iter(loader)

    def next_batch() -> tuple[Any, Any]:
        nonlocal iterator, epoch
        try:
            return next(iterator)
        except StopIteration:
            epoch += 1
            loader.set_epoch(epoch)
            iterator = iter(loader)
            return next(iterator)

    for _ in range(warmup):
        next_batch()
    _sync(dev)
    rates, seconds_list, counted = [], [], []
    endpoint = endpoint_pids()  # the emulated endpoint's processes (bench.cpu)
    cpu0, wall0, tree0 = cpu_of(endpoint), time.perf_counter(), tree_cpu_s()
    stages0 = stage_times(loader)
    for _ in range(repeats):
        n = 0
        start = time.perf_counter()
        while n < samples:
            images, _labels = next_batch()
            n += int(images.shape[0])
        _sync(dev)
        seconds = time.perf_counter() - start
        rates.append(n / seconds)
        seconds_list.append(seconds)
        counted.append(n)
    tree_s = tree_cpu_s() - tree0
    stages1 = stage_times(loader)
    endpoint_share = None
    if endpoint:
        share = (cpu_of(endpoint) - cpu0) / ((time.perf_counter() - wall0) * (os.cpu_count() or 1))
        endpoint_share = round(share, 3)
    del iterator
    loader.close()
    middle = sorted(range(repeats), key=lambda i: rates[i])[repeats // 2]
    return {
        "img_per_s": statistics.median(rates),
        "seconds": seconds_list[middle],
        "samples": counted[middle],
        "repeats_img_per_s": rates,
        "cpu_us_per_img": 1e6 * tree_s / sum(counted),
        "stages_cpu_us_per_img": per_image(stages0, stages1, "cpu", sum(counted)),
        "stages_wall_us_per_img": per_image(stages0, stages1, "wall", sum(counted)),
        "setup_s": setup_s,
        "decode_device": loader.decode_device,
        "downloads": [d.__dict__ for d in loader.downloads],
        "stats": loader.stats(),
        "prefetch_plan": loader.prefetch_plan,
        "endpoint_cpu_share": endpoint_share,
    }


def per_image(before: Snapshot | None, after: Snapshot | None, kind: str, images: int) -> dict | None:
    """Microseconds per image per stage between two stage readings (`kind`: wall or cpu), in the
    contract's stage order; None when the loader reports no stages."""
    if before is None or after is None or not images:
        return None
    now, then = after[kind], before[kind]
    return {stage: round(1e6 * (now[stage] - then.get(stage, 0.0)) / images, 2) for stage in now}


def main(argv: list[str] | None = None) -> None:
    p = CliParser(prog="bench.measure", description=__doc__)
    p.add_argument("--loader", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--samples", type=int, default=20_000)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=REPEATS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--options", default="{}", help="JSON dict of backend options")
    args = run_cli("bench.measure", lambda: p.parse_args(argv))  # a bad flag: one line, exit 2
    try:
        result = measure(
            args.loader,
            args.data,
            batch_size=args.batch_size,
            workers=args.workers,
            samples=args.samples,
            warmup=args.warmup,
            repeats=args.repeats,
            device=args.device,
            options=json.loads(args.options),
        )
    except FeedrateError as exc:
        print(json.dumps({"skipped": str(exc)}))
        sys.exit(0)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
