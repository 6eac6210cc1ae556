"""What measuring the stages costs the loaders: `python -m tests.stage_cost --data ROOT [--loader L ...]`.

Each loader is measured loader-only (bench.measure: CPU microseconds per image of the process tree over
the timed passes) with its stage instrumentation as shipped ("on") and with it removed ("off": the
StageTimes calls made no-ops, the torchvision dataset's per-sample clock reads and the batch markers
replaced by the plain code), in alternating fresh processes, and the medians compared. Removing it is a
measuring device only, done here by patching: the loaders have no switch, since the cost is small (see
the figures in the lead's report; it stays on in train.py and the bench).

It is a benchmark, not a test: the figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
from typing import Any

_NULL = contextlib.nullcontext()


def instrumentation_off() -> None:
    """Patch the stage instrumentation out of this process (and of the workers it forks)."""
    from PIL import Image
    from torch.utils.data import default_collate

    from loaders import baseline
    from loaders.stagetimes import StageTimes

    StageTimes.timed = lambda self, stage: _NULL  # type: ignore[method-assign]
    StageTimes.add = lambda self, stage, wall, cpu: None  # type: ignore[method-assign]
    StageTimes.merge = lambda self, snapshot: None  # type: ignore[method-assign]

    def getitem(self: baseline.CifarArrays, index: int) -> tuple[Any, int]:
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])

    def collate(self: baseline._Collate, samples: list) -> tuple:
        images, labels = default_collate(samples)
        return None, images, labels, None, None

    baseline.CifarArrays.__getitem__ = getitem  # type: ignore[method-assign]
    baseline._Collate.__call__ = collate  # type: ignore[method-assign]


def one(args: argparse.Namespace) -> None:
    """One measurement in this process: prints bench.measure's figures as JSON."""
    if args.mode == "off":
        instrumentation_off()
    from bench.measure import measure

    out = measure(
        args.loader[0],
        args.data,
        batch_size=256,
        workers=args.workers,
        samples=args.samples,
        warmup=5,
        repeats=args.repeats,
        device="cpu",
    )
    print(json.dumps({"cpu_us_per_img": out["cpu_us_per_img"], "img_per_s": out["img_per_s"]}))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="tests.stage_cost", description=__doc__)
    p.add_argument("--data", required=True, help="dataset root (shardgen)")
    p.add_argument("--loader", action="append", help="loaders to measure (default: torchvision wds tensor)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--samples", type=int, default=20_000)
    p.add_argument("--repeats", type=int, default=3, help="timed passes per process")
    p.add_argument("--rounds", type=int, default=3, help="on/off process pairs per loader")
    p.add_argument("--mode", choices=("on", "off"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mode:
        one(args)
        return
    for loader in args.loader or ["torchvision", "wds", "tensor"]:
        figures: dict[str, list[float]] = {"on": [], "off": []}
        for _ in range(args.rounds):
            for mode in ("on", "off"):
                cmd = [sys.executable, "-m", "tests.stage_cost", "--mode", mode, "--data", args.data]
                cmd += ["--loader", loader, "--workers", str(args.workers), "--samples", str(args.samples)]
                cmd += ["--repeats", str(args.repeats)]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                figures[mode].append(json.loads(done.stdout.splitlines()[-1])["cpu_us_per_img"])
        on, off = statistics.median(figures["on"]), statistics.median(figures["off"])
        print(
            f"{loader}: CPU us/img on {on:.2f} off {off:.2f}: instrumentation {on - off:+.2f} us/img "
            f"({100 * (on - off) / off:+.1f}%); runs on {figures['on']} off {figures['off']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
