"""Train ResNet-50 on CIFAR-10 with any feedrate loader and record where the time goes.

    python train.py --loader torchvision --data data/shards --epochs 1 --workers 2

Each epoch trains on the `train` split, then evaluates on the `test` split (`--max-batches` caps both).
Writes the seed's CSV (`train.csv`) and `run.json` into `--out` (default: a fresh
results/runs/<timestamp>-<loader>). Per batch it times the wait on the loader and the step on one clock
(feedrate.timing); the model, its recipe and the step are in feedrate.models. `--emulate RATE` replaces
the model with an emulated accelerator that needs batch_size/RATE seconds per step, as MLPerf Storage's
DLIO does.

Ctrl-C or SIGTERM stops the run cleanly: the CSV keeps its complete rows, run.json says "interrupted",
and the exit code is 130. Bad input is one line on stderr and exit code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import math
import os
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import loaders
from feedrate import results
from feedrate.errors import FeedrateError, run_cli
from feedrate.manifest import Manifest, load_manifest
from feedrate.models import ARCHS, Stepper, peak_lr
from feedrate.progress import progress
from feedrate.storage import open_store, redact_url
from feedrate.timing import Clock, EpochStats, EpochTimer, combine

PROG = "train.py"
DEVICES = ("auto", "cuda", "cpu")
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise FeedrateError(message)  # one line and exit 2 via run_cli, like every other bad input


def get_args_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--loader", default="torchvision", help=f"one of: {', '.join(loaders.available())}")
    p.add_argument("--data", default="data/shards", help="dataset root: path, file://, s3:// or cos://")
    p.add_argument("--epochs", type=int, default=1, help="training epochs, each followed by validation")
    p.add_argument("--batch-size", type=int, default=256, help="samples per batch")
    p.add_argument("--workers", type=int, default=2, help="loader worker processes / threads")
    p.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cuda or cpu")
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate for batch 256 (scaled)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: a fresh one)")
    p.add_argument("--max-batches", type=int, default=None, help="cap batches per epoch (train and val)")
    p.add_argument("--arch", default="resnet50", help=f"one of: {', '.join(ARCHS)}")
    p.add_argument("--seed", type=int, default=0, help="model init, shuffle and augmentation seed")
    p.add_argument("--overwrite", action="store_true", help="replace results in an existing --out")
    p.add_argument("--emulate", type=float, default=None, metavar="RATE", help="emulate a RATE img/s device")
    p.add_argument("--endpoint-url", default=None, help="S3/COS endpoint (else from the environment)")
    p.add_argument("--cache-dir", default=None, help="where loaders may cache downloaded data")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="no mixed precision on CUDA")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="NCHW on CUDA")
    return p


@dataclass(frozen=True)
class TrainConfig:
    """The validated run settings; every bad value is a FeedrateError naming it and what is accepted."""

    loader: str
    data: str
    epochs: int
    batch_size: int
    workers: int
    device: str
    lr: float
    out: Path | None
    max_batches: int | None
    arch: str
    seed: int
    overwrite: bool
    emulate: float | None
    endpoint_url: str | None
    cache_dir: str | None
    amp: bool
    channels_last: bool

    def __post_init__(self) -> None:
        for flag, value, accepted in (
            ("--loader", self.loader, loaders.available()),
            ("--device", self.device, DEVICES),
            ("--arch", self.arch, ARCHS),
        ):
            if value not in accepted:
                raise FeedrateError(f"unknown {flag} {value!r}; accepted: {', '.join(accepted)}")
        for flag, value, low in (
            ("--epochs", self.epochs, 1),
            ("--batch-size", self.batch_size, 1),
            ("--workers", self.workers, 0),
            ("--max-batches", self.max_batches, 1),
        ):
            if value is not None and value < low:
                raise FeedrateError(f"{flag} {value} must be >= {low}")
        for flag, value in (("--lr", self.lr), ("--emulate", self.emulate)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise FeedrateError(f"{flag} {value} must be a positive number")
        if not self.data.strip():
            raise FeedrateError("--data is empty; expected a dataset root (path, file://, s3://, cos://)")


def resolve_device(name: str, workers: int) -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without it is an error, never a fallback.

    On the CPU the model's intra-op threads share the cores with the loader's worker processes. Left at
    one thread per core they spin-wait against the workers and a step runs several times slower (4x for
    the small net on 2 cores with 2 workers), so the model gets the cores the workers leave, at least
    one, unless OMP_NUM_THREADS says otherwise.
    """
    if name == "cuda" and not torch.cuda.is_available():
        raise FeedrateError("--device cuda: no CUDA device is available here; use --device auto or cpu")
    if name != "cpu" and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        print(f"{PROG}: device {device} ({torch.cuda.get_device_name(device)})", flush=True)
        return device
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, results.machine()["cpu_usable"] - workers))
    why = "requested" if name == "cpu" else "no CUDA device found"
    print(f"{PROG}: device cpu ({why}; {torch.get_num_threads()} compute threads)", flush=True)
    return torch.device("cpu")


def output_dir(cfg: TrainConfig) -> Path:
    """Where results go; checked (never created) here, so bad input leaves nothing behind."""
    if cfg.out is None:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = Path("results") / "runs" / f"{stamp}-{cfg.loader}"
        out, n = base, 1
        while out.exists():
            n += 1
            out = base.with_name(f"{base.name}-{n}")
        return out
    if cfg.out.exists() and not cfg.out.is_dir():
        raise FeedrateError(f"--out {cfg.out} exists and is not a directory")
    if cfg.out.is_dir() and any(cfg.out.iterdir()) and not cfg.overwrite:
        raise FeedrateError(f"--out {cfg.out} already exists; pass --overwrite or choose another directory")
    return cfg.out


def run_epoch(
    loader: loaders.Loader, planned: int, step: Any, clock: Clock, desc: str, on_batch: Any = None
) -> EpochStats:
    """Feed `planned` batches of `loader` to `step`, timing each; `on_batch(timer, batch)` after each."""
    timer = EpochTimer(clock)
    batches: Iterator | None = None

    def next_batch() -> Any:
        nonlocal batches
        if batches is None:
            batches = iter(loader)  # may start worker processes: part of the first batch's wait
        return next(batches)

    try:
        with progress(total=planned, desc=desc, unit="batch") as bar:
            for _ in range(planned):
                try:
                    images, labels = timer.fetch(next_batch)
                except StopIteration:
                    raise FeedrateError(
                        f"loader ended after {len(timer.batches)} batches; its len() promised {planned}"
                    ) from None
                step(images, labels)
                batch = timer.end_step(int(labels.shape[0]))
                if on_batch is not None:
                    on_batch(timer, batch)
                bar.update()
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()  # stop a capped epoch's workers now, outside the timed span
    return timer.stats()


@contextlib.contextmanager
def signals(action: Any) -> Iterator[None]:
    """Within the block SIGINT and SIGTERM get `action` (main thread only; restored after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.signal(s, action) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def make_loaders(cfg: TrainConfig, device: torch.device) -> dict[str, loaders.Loader]:
    """The training and validation loaders (both built, and any downloads made, before output exists)."""
    made = {}
    for split in loaders.base.SPLITS:
        lcfg = loaders.LoaderConfig(
            data=cfg.data,
            split=split,
            batch_size=cfg.batch_size,
            train=split == "train",
            workers=cfg.workers,
            device=str(device),
            seed=cfg.seed,
            endpoint_url=cfg.endpoint_url,
            cache_dir=cfg.cache_dir,
        )
        made[split] = loaders.make_loader(cfg.loader, lcfg)
    return made


def describe(
    cfg: TrainConfig,
    out: Path,
    manifest: Manifest,
    stepper: Stepper,
    made: dict[str, loaders.Loader],
    plan: dict[str, int],
) -> dict[str, Any]:
    """run.json's fixed part: how this run was made (no secrets: URLs redacted, no environment)."""
    return {
        "status": "running",
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "csv": results.CSV_NAME,
        "config": asdict(cfg)
        | {
            "data": redact_url(cfg.data),
            "endpoint_url": redact_url(cfg.endpoint_url) if cfg.endpoint_url else None,
            "out": str(out),
            "peak_lr": None if cfg.emulate else peak_lr(cfg.lr, cfg.batch_size),
            "planned_batches": plan,
        },
        "dataset": {"kind": manifest.kind, "encoding": manifest.encoding, "source": manifest.source}
        | {f"{split}_samples": manifest.splits[split].samples for split in made},
        "device": {
            "type": stepper.device.type,
            "name": results.device_name(stepper.device),
            "amp": str(stepper.amp_dtype).removeprefix("torch.") if stepper.amp_dtype else None,
            "channels_last": stepper.channels_last,
            "torch_threads": torch.get_num_threads(),
            "emulated_img_per_s": cfg.emulate,
        },
        "loader": {"name": cfg.loader, "decode_device": made["train"].decode_device},
        "versions": results.library_versions(),
        "git": results.git_state(Path(__file__).resolve().parent),
        "machine": results.machine(),
        "downloads": [asdict(d) for loader in made.values() for d in loader.downloads],
        "epochs": [],
    }


def train(cfg: TrainConfig) -> int:
    device = resolve_device(cfg.device, cfg.workers)
    out = output_dir(cfg)
    store = open_store(cfg.data, endpoint_url=cfg.endpoint_url)
    store.check_readable()
    manifest = load_manifest(store)
    for split in loaders.base.SPLITS:
        if split not in manifest.splits or manifest.splits[split].samples < 1:
            raise FeedrateError(f"split {split!r} of {redact_url(cfg.data)} is empty or missing")
    torch.manual_seed(cfg.seed)
    made = make_loaders(cfg, device)
    train_loader, val_loader = made["train"], made["test"]
    plan = {split: min(len(loader), cfg.max_batches or len(loader)) for split, loader in made.items()}
    stepper = Stepper(
        cfg.arch,
        len(manifest.class_names),
        device,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        total_steps=cfg.epochs * plan["train"],
        amp=cfg.amp,
        channels_last=cfg.channels_last,
        emulate=cfg.emulate,
    )
    clock = Clock(torch.cuda.synchronize if device.type == "cuda" else None)

    out.mkdir(parents=True, exist_ok=True)
    for name in (results.CSV_NAME, results.RUN_JSON_NAME):
        (out / name).unlink(missing_ok=True)
    doc = describe(cfg, out, manifest, stepper, made, plan)
    trained: list[EpochStats] = []

    def save(status: str) -> None:
        doc["status"] = status
        doc["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        doc["counters"] = {split: loader.stats() for split, loader in made.items()}
        doc["summary"] = combine(trained)
        results.write_json_atomic(out / results.RUN_JSON_NAME, doc)

    with results.CsvLog(out / results.CSV_NAME) as log:
        status = "failed"
        try:
            with signals(_interrupt):
                for d in train_loader.downloads + val_loader.downloads:
                    log.download(d.split, d.start, d.loading, d.duration, d.samples)
                save("running")
                for epoch in range(1, cfg.epochs + 1):
                    for loader in made.values():
                        loader.set_epoch(epoch)
                    tag = f"epoch {epoch}/{cfg.epochs}"

                    def log_batch(timer: EpochTimer, batch: Any, epoch: int = epoch) -> None:
                        log.batch(epoch, timer.start, batch, plan["train"])

                    tr = run_epoch(
                        train_loader, plan["train"], stepper.train_step, clock, f"{tag} train", log_batch
                    )
                    accuracy = stepper.take_accuracy()
                    log.epoch(results.TRAIN_EPOCH, epoch, tr, *accuracy)
                    trained.append(tr)
                    entry = {"epoch": epoch, "train": _phase(tr, accuracy), "val": None}
                    doc["epochs"].append(entry)
                    va = run_epoch(val_loader, plan["test"], stepper.eval_step, clock, f"{tag} val")
                    accuracy = stepper.take_accuracy()
                    log.epoch(results.VAL_EPOCH, epoch, va, *accuracy)
                    entry["val"] = _phase(va, accuracy)
                    save("running")
            status = "complete"
        except KeyboardInterrupt:
            status = "interrupted"
        finally:
            with signals(signal.SIG_IGN):  # a second Ctrl-C must not tear run.json
                save(status)
    summarize(out, doc, status)
    return EXIT_INTERRUPTED if status == "interrupted" else 0


def _phase(stats: EpochStats, accuracy: tuple[float | None, float | None]) -> dict[str, Any]:
    return stats.as_dict() | {"top1": accuracy[0], "top5": accuracy[1]}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def summarize(out: Path, doc: dict[str, Any], status: str) -> None:
    s, epochs = doc["summary"], doc["epochs"]
    rate = "n/a" if s["img_per_s"] is None else f"{s['img_per_s']:.1f} img/s"
    top1 = epochs[-1]["val"]["top1"] if epochs and epochs[-1]["val"] else None
    print(f"{PROG}: {status}; results in {out / results.CSV_NAME} (run.json beside it)", flush=True)
    if not epochs:
        print(f"{PROG}: no epoch completed; the CSV holds the batches that did", flush=True)
        return
    print(
        f"{PROG}: training {rate}, data wait {_pct(s['data_wait_fraction'])}, AU {_pct(s['au'])}, "
        f"val top-1 {'n/a' if top1 is None else f'{top1:.3f}'}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, lambda: train(TrainConfig(**vars(get_args_parser().parse_args(argv)))))


if __name__ == "__main__":
    sys.exit(main())
