"""Train ResNet-50 on CIFAR-10 with any feedrate loader and record where the time goes.

    python train.py --loader torchvision --data data/shards --epochs 1 --workers 2

Each epoch trains on the `train` split, then evaluates on the `test` split (`--max-batches` caps both).
Writes the seed's CSV (`train.csv`) and `run.json` into `--out` (default: a fresh
results/runs/<timestamp>-<loader>). Per batch it times the wait on the loader and the step on one clock
(training.timing); the model, its recipe and the step are in training.models. `--emulate RATE` replaces
the model with an emulated accelerator that needs batch_size/RATE seconds per step, as MLPerf Storage's
DLIO does.

Ctrl-C or SIGTERM stops the run cleanly: the CSV keeps its complete rows, run.json says "interrupted",
and the exit code is 130. Bad input is one line on stderr and exit code 2, before anything is written.

Several processes, one node or many (torchrun sets the environment; training.distributed reads it):

    torchrun --standalone --nproc_per_node=2 train.py --loader tensor ...      (make train-cifar NPROC=2)
    torchrun --nnodes=2 --node_rank=K --rdzv_endpoint=HOST:PORT --nproc_per_node=N train.py ...

- DDP over gloo on the CPU, nccl on CUDA (each process takes cuda:LOCAL_RANK). `--batch-size` is per
  process; the learning rate scales with the global batch (batch size x processes). `--dist-timeout`
  bounds the start and every collective, so a lost peer ends the run instead of hanging it.
- Every loader gives each rank a disjoint part of each split (LoaderConfig.rank / world_size).
- Equal steps, by dropping: all ranks run the fewest training batches any rank has (an all-reduced
  minimum), so none waits forever in a gradient all-reduce that its peers never join. A rank's samples
  past that point are left out of the epoch and counted in run.json (`distributed.splits.train.dropped`),
  as are repeats a loader adds to even the parts out (`padded`: the torchvision loader's
  DistributedSampler pads the last ranks' parts with repeats). Validation runs every rank's whole part
  with the unwrapped model (no per-batch collective), after rank 0's BatchNorm statistics are broadcast.
- Accuracy is summed over the ranks (hits and samples), so it is the whole epoch's. Only rank 0 prints
  and writes the CSV (its own batches' times) and run.json (every rank's epoch times under `ranks`, the
  job's figures beside them: training.timing.across_ranks). Other ranks print nothing but errors.
- A signal (torchrun forwards Ctrl-C / SIGTERM to every rank) still leaves a complete CSV and a run.json
  marked interrupted on rank 0: after a signal no rank starts another collective.
- Single process (WORLD_SIZE unset or 1): no process group at all, exactly as before.

Debugging aid: with FEEDRATE_TRACE_SAMPLES=PATH every rank appends, per batch, its split, epoch, batch
number, labels and each image's centre pixel (normalised) as one JSON line to PATH.rank<R>; the tests
use it on images whose pixels encode their sample index (tests/encoded.py) to see which samples each
rank trained on. It costs time inside the step: never use it for measurements.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import loaders
from feedrate import network
from feedrate.errors import FeedrateError, run_cli
from feedrate.manifest import Manifest, load_manifest
from feedrate.progress import progress
from feedrate.storage import open_store, redact_url
from training import results
from training.distributed import DEFAULT_TIMEOUT_S, Group, SplitPlan, Topology, plan_epochs, sum_counters
from training.models import ARCHS, Stepper, peak_lr
from training.timing import Clock, EpochStats, EpochTimer, across_ranks, combine_ranks

PROG = "train.py"
DEVICES = ("auto", "cuda", "cpu")
EXIT_INTERRUPTED = 130
TRACE_ENV = "FEEDRATE_TRACE_SAMPLES"


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
    p.add_argument(
        "--net",
        default="",
        metavar="PRESET",
        help="the link to the data (a network preset: "
        + ", ".join(network.PRESETS)
        + "): loaders size their prefetching for it instead of measuring; run.json records it",
    )
    p.add_argument("--no-amp", dest="amp", action="store_false", help="no mixed precision on CUDA")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="NCHW on CUDA")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip bad samples (corrupt, incomplete, bad label): counted in run.json and named on stderr",
    )
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help="under torchrun: longest wait for the other processes (start, each collective)",
    )
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
    dist_timeout: float = DEFAULT_TIMEOUT_S
    skip_bad: bool = False
    net: str = ""

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
        for flag, value in (
            ("--lr", self.lr),
            ("--emulate", self.emulate),
            ("--dist-timeout", self.dist_timeout),
        ):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise FeedrateError(f"{flag} {value} must be a positive number")
        if self.net:
            network.preset(self.net)  # an unknown name is a one-line error naming the accepted ones
        if not self.data.strip():
            raise FeedrateError("--data is empty; expected a dataset root (path, file://, s3://, cos://)")


def resolve_device(name: str, workers: int, topology: Topology | None = None) -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without it is an error, never a fallback.

    Under torchrun each process takes the GPU of its LOCAL_RANK (cuda:LOCAL_RANK), so a node runs at
    most one process per GPU. On the CPU the model's intra-op threads share the cores with the loader's
    worker processes (and with the node's other ranks). Left at one thread per core they spin-wait
    against the workers and a step runs several times slower (4x for the small net on 2 cores with 2
    workers), so the model gets the cores the workers leave, at least one, unless OMP_NUM_THREADS says
    otherwise (torchrun sets it to 1 for several processes per node unless it is set already).
    """
    topology = topology or Topology()
    processes = f"; {topology.world_size} processes" if topology.distributed else ""
    if name == "cuda" and not torch.cuda.is_available():
        raise FeedrateError("--device cuda: no CUDA device is available here; use --device auto or cpu")
    if name != "cpu" and torch.cuda.is_available():
        if topology.distributed:
            count = torch.cuda.device_count()
            if topology.local_rank >= count:
                raise FeedrateError(
                    f"LOCAL_RANK={topology.local_rank} needs a GPU of its own and this node has {count}; "
                    f"run at most {count} processes per node, or use --device cpu"
                )
            torch.cuda.set_device(topology.local_rank)
        device = torch.device("cuda", torch.cuda.current_device())
        if topology.is_main:
            print(f"{PROG}: device {device} ({torch.cuda.get_device_name(device)}){processes}", flush=True)
        return device
    if "OMP_NUM_THREADS" not in os.environ:
        cores = results.machine()["cpu_usable"] // topology.local_world_size
        torch.set_num_threads(max(1, cores - workers))
    why = "requested" if name == "cpu" else "no CUDA device found"
    if topology.is_main:
        print(f"{PROG}: device cpu ({why}; {torch.get_num_threads()} compute threads{processes})", flush=True)
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
    loader: loaders.Loader,
    planned: int,
    step: Any,
    clock: Clock,
    desc: str,
    on_batch: Any = None,
    bar: bool = True,
    stop: StopRequest | None = None,
    may_end_early: bool = False,
) -> EpochStats:
    """Feed `planned` batches of `loader` to `step`, timing each; `on_batch(timer, batch)` after each.

    `bar=False` keeps the progress bar off (every rank but 0 under torchrun). `stop`: a signal ends the
    batch loop at once (see StopRequest), never the clean-up after it. `may_end_early`: with --skip-bad a
    loader that skipped samples may run out before `planned` batches; the epoch then ends there.
    """
    timer = EpochTimer(clock)
    batches: Iterator | None = None

    def next_batch() -> Any:
        nonlocal batches
        if batches is None:
            batches = iter(loader)  # may start worker processes: part of the first batch's wait
        return next(batches)

    try:
        interruptible = stop.interruptible() if stop is not None else contextlib.nullcontext()
        quiet = {} if bar else {"disable": True}
        with progress(total=planned, desc=desc, unit="batch", **quiet) as shown, interruptible:
            for _ in range(planned):
                try:
                    images, labels = timer.fetch(next_batch)
                except StopIteration:
                    if may_end_early:
                        break
                    raise FeedrateError(
                        f"loader ended after {len(timer.batches)} batches; its len() promised {planned}"
                    ) from None
                step(images, labels)
                batch = timer.end_step(int(labels.shape[0]))
                if on_batch is not None:
                    on_batch(timer, batch)
                shown.update()
                if stop is not None:
                    stop.check()  # in case the signal's own raise was lost (see StopRequest)
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


class StopRequest(contextlib.AbstractContextManager):
    """Within the block, the run's SIGINT/SIGTERM handler. Only the first signal counts: the clean-up it
    starts is never cut short by a second (torchrun forwards the signal it gets, and a peer's exit may
    make it send another).

    Inside `interruptible()` (the batch loop: a blocked fetch, a long step) the signal raises
    KeyboardInterrupt at once. Elsewhere it is only noted and `check()` raises it at the next safe
    point, so it never lands in clean-up code such as a DataLoader iterator's `__del__`, which would
    print it and swallow it. (Inside the block it still can, in an at-fork hook when a DataLoader
    starts its workers: the batch loop calls `check()` after every batch for that.)

    The first signal also sets SIGCHLD back to its default until the block ends: torchrun signals each
    rank's whole process group, and torch's SIGCHLD handler would otherwise raise about DataLoader
    workers that die of the same signal in the middle of the clean-up.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._armed = False
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._saved = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            return
        self.signum = signum
        self._saved.setdefault(signal.SIGCHLD, signal.signal(signal.SIGCHLD, signal.SIG_DFL))
        if self._armed:
            self._armed = False
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """A block that a signal interrupts at once (after `check()` on entry)."""
        self.check()
        self._armed = True
        try:
            yield
        finally:
            self._armed = False

    def requested(self) -> bool:
        """Whether a signal came. A method, so a signal still pending when it is called is handled
        first (CPython runs signal handlers on calls)."""
        return self.signum is not None

    def check(self) -> None:
        """Raise KeyboardInterrupt if a signal came."""
        if self.signum is not None:
            raise KeyboardInterrupt


def make_loaders(
    cfg: TrainConfig, device: torch.device, topology: Topology | None = None
) -> dict[str, loaders.Loader]:
    """The training and validation loaders (both built, and any downloads made, before output exists).

    Under torchrun each serves this rank's part of its split (see `topology`).
    """
    topology = topology or Topology()
    if cfg.skip_bad and topology.world_size > 1:
        # A rank that skips samples runs short and would leave the others waiting in a collective.
        raise FeedrateError("--skip-bad works with one process only for now; run without torchrun")
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
            rank=topology.rank,
            world_size=topology.world_size,
            options=({"skip_bad": True} if cfg.skip_bad else {}) | ({"net": cfg.net} if cfg.net else {}),
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
    group: Group,
    plans: dict[str, SplitPlan],
    ranks: list[dict[str, Any]],
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
            "peak_lr": None if cfg.emulate else peak_lr(cfg.lr, cfg.batch_size * group.world_size),
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
        "loader": {
            "name": cfg.loader,
            "decode_device": made["train"].decode_device,
            "prefetch_plan": getattr(made["train"], "prefetch_plan", None),
        },
        "versions": results.library_versions(),
        "git": results.git_state(Path(__file__).resolve().parent),
        "machine": results.machine(),
        "downloads": [asdict(d) for loader in made.values() for d in loader.downloads],
        "distributed": None
        if not group.distributed
        else {
            "world_size": group.world_size,
            "backend": group.backend,
            "global_batch_size": cfg.batch_size * group.world_size,
            "policy": "drop: every rank runs the fewest training batches any rank has; validation runs "
            "each rank's whole part",
            "splits": {split: p.as_dict() for split, p in plans.items()},
            "ranks": ranks,
            "rank_counters": None,
        },
        "epochs": [],
    }


def _prepare(
    cfg: TrainConfig, group: Group, device: torch.device
) -> tuple[Path | None, Manifest, dict[str, loaders.Loader]]:
    """Everything that can fail on bad input, before anything is written (rank 0 alone owns --out)."""
    out = output_dir(cfg) if group.is_main else None
    store = open_store(cfg.data, endpoint_url=cfg.endpoint_url)
    store.check_readable()
    manifest = load_manifest(store)
    for split in loaders.base.SPLITS:
        if split not in manifest.splits or manifest.splits[split].samples < 1:
            raise FeedrateError(f"split {split!r} of {redact_url(cfg.data)} is empty or missing")
    torch.manual_seed(cfg.seed)
    return out, manifest, make_loaders(cfg, device, group.topology)


def _open_output(out: Path | None) -> None:
    """Create --out and clear the files a run writes (rank 0; `out` is None on the others)."""
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    for name in (results.CSV_NAME, results.RUN_JSON_NAME):
        (out / name).unlink(missing_ok=True)


def traced(step: Callable[[Any, Any], None], path: Path | None, rank: int, split: str, epoch: int) -> Any:
    """`step`, first appending the batch's identity to `path` (FEEDRATE_TRACE_SAMPLES; None: `step`)."""
    if path is None:
        return step

    def run(images: torch.Tensor, labels: torch.Tensor) -> None:
        centre = images[:, :, images.shape[2] // 2, images.shape[3] // 2].float().cpu()
        line = {"rank": rank, "split": split, "epoch": epoch, "labels": labels.tolist()}
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line | {"centre": centre.tolist()}) + "\n")
        step(images, labels)

    return run


def train(cfg: TrainConfig) -> int:
    topology = Topology.from_env(os.environ)
    device = resolve_device(cfg.device, cfg.workers, topology)
    group = Group.start(topology, device, cfg.dist_timeout)
    try:
        return _train(cfg, group, device)
    finally:
        group.close()


def _train(cfg: TrainConfig, group: Group, device: torch.device) -> int:
    out, manifest, made = group.setup(lambda: _prepare(cfg, group, device))
    train_loader, val_loader = made["train"], made["test"]
    plans = plan_epochs(
        group,
        {split: manifest.splits[split].samples for split in made},
        {split: (loader.samples, len(loader)) for split, loader in made.items()},
        cfg.batch_size,
        cfg.max_batches,
    )
    plan = {split: p.batches[group.rank] for split, p in plans.items()}
    ranks = group.gather(
        {
            "rank": group.rank,
            "local_rank": group.topology.local_rank,
            "host": socket.gethostname(),
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
        }
    )
    stepper = Stepper(
        cfg.arch,
        len(manifest.class_names),
        device,
        lr=cfg.lr,
        batch_size=cfg.batch_size * group.world_size,
        total_steps=cfg.epochs * plan["train"],
        amp=cfg.amp,
        channels_last=cfg.channels_last,
        emulate=cfg.emulate,
        distributed=group.distributed,
    )
    clock = Clock(torch.cuda.synchronize if device.type == "cuda" else None)
    trace = os.environ.get(TRACE_ENV, "").strip()
    trace_path = Path(f"{trace}.rank{group.rank}") if trace else None

    def stats_now() -> dict[str, dict[str, int]]:
        return {split: loader.stats() for split, loader in made.items()}

    group.setup(lambda: _open_output(out))  # a rank-0 failure here (read-only --out) stops every rank
    doc: dict[str, Any] = {"epochs": []}
    if out is not None:  # rank 0
        doc = describe(cfg, out, manifest, stepper, made, plan, group, plans, ranks)
    trained: list[list[EpochStats]] = []  # [epoch][rank]
    rank_counters = group.gather(stats_now())

    def save(status: str) -> None:
        if out is None:
            return
        doc["status"] = status
        doc["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        if group.distributed:  # as of the last epoch's end: after a signal no rank gathers again
            doc["counters"] = sum_counters(rank_counters)
            doc["distributed"]["rank_counters"] = rank_counters
        else:
            doc["counters"] = stats_now()
        doc["summary"] = combine_ranks(trained)
        results.write_json_atomic(out / results.RUN_JSON_NAME, doc)

    stop = StopRequest()
    log = results.CsvLog(out / results.CSV_NAME) if out is not None else results.NoLog()
    with log, stop:
        status = "failed"
        try:
            try:
                for d in train_loader.downloads + val_loader.downloads:
                    log.download(d.split, d.start, d.loading, d.duration, d.samples)
                save("running")
                for epoch in range(1, cfg.epochs + 1):
                    for loader in made.values():
                        loader.set_epoch(epoch)
                    tag = f"epoch {epoch}/{cfg.epochs}"

                    def log_batch(timer: EpochTimer, batch: Any, epoch: int = epoch) -> None:
                        log.batch(epoch, timer.start, batch, plan["train"])

                    step = traced(stepper.train_step, trace_path, group.rank, "train", epoch)
                    tr = run_epoch(
                        train_loader,
                        plan["train"],
                        step,
                        clock,
                        f"{tag} train",
                        log_batch,
                        group.is_main,
                        stop,
                        cfg.skip_bad,
                    )
                    stop.check()  # no rank starts a collective after a signal it has seen
                    tr_ranks = group.gather(tr)
                    accuracy = stepper.take_accuracy(group.all_sum)
                    log.epoch(results.TRAIN_EPOCH, epoch, tr, *accuracy)
                    trained.append(tr_ranks)
                    entry = {"epoch": epoch, "train": _phase(tr_ranks, accuracy), "val": None}
                    doc["epochs"].append(entry)
                    stop.check()
                    group.broadcast_buffers(stepper.module)
                    step = traced(stepper.eval_step, trace_path, group.rank, "test", epoch)
                    va = run_epoch(
                        val_loader,
                        plan["test"],
                        step,
                        clock,
                        f"{tag} val",
                        None,
                        group.is_main,
                        stop,
                        cfg.skip_bad,
                    )
                    stop.check()
                    va_ranks, rank_counters = map(list, zip(*group.gather((va, stats_now())), strict=True))
                    accuracy = stepper.take_accuracy(group.all_sum)
                    log.epoch(results.VAL_EPOCH, epoch, va, *accuracy)
                    entry["val"] = _phase(va_ranks, accuracy)
                    save("running")
            except BaseException:
                # Any failure after a signal is that stop: a peer that stopped on it breaks a collective.
                if stop.requested():
                    raise KeyboardInterrupt from None
                raise
            status = "complete"
        except KeyboardInterrupt:
            status = "interrupted"
        except Exception as exc:  # a bug, or a peer that died (its collective fails here): say which
            doc["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:1000]
            raise
        finally:
            with signals(signal.SIG_IGN):  # a second Ctrl-C must not tear run.json
                save(status)
                for loader in made.values():
                    close = getattr(loader, "close", None)
                    if close is not None:
                        close()  # persistent workers stop now, while no signal can break in
    if out is not None:
        summarize(out, doc, status)
    return EXIT_INTERRUPTED if status == "interrupted" else 0


def _phase(ranks: list[EpochStats], accuracy: tuple[float | None, float | None]) -> dict[str, Any]:
    """An epoch's entry in run.json: the job's figures, accuracy, and each rank's own (several ranks)."""
    own = {"ranks": [r.as_dict() for r in ranks]} if len(ranks) > 1 else {}
    return across_ranks(ranks) | {"top1": accuracy[0], "top5": accuracy[1]} | own


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
    skipped = sum(int(c.get("skipped", 0)) for c in (doc.get("counters") or {}).values())
    if skipped:
        print(f"{PROG}: {skipped} bad samples skipped (--skip-bad; counters in run.json)", flush=True)


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, lambda: train(TrainConfig(**vars(get_args_parser().parse_args(argv)))))


if __name__ == "__main__":
    sys.exit(main())
