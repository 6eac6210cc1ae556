"""Train ResNet-50 on CIFAR-10 with any feedrate loader and record where the time goes.

    python train.py --loader torchvision --data data/shards --epochs 1 --workers 2
    torchrun --standalone --nproc_per_node=2 train.py --loader tensor ...      (make train-cifar NPROC=2)

Each epoch trains on `train`, then evaluates on `test`, and writes the seed's CSV and run.json into
`--out` (training.results); the wait on the loader and the step are timed on one clock (training.timing).
`--emulate RATE` stands an emulated accelerator in for the model (training.models); under torchrun each
process trains on its own part of each split (training.distributed). Ctrl-C or SIGTERM, from the start
of `main()`, stops the run cleanly with exit code 130 (training.interrupts); bad input is one line on
stderr and exit code 2, before anything is written.

    python train.py ... --checkpoint-dir ckpt --checkpoint-every 100     (killed, then:)
    python train.py ... --checkpoint-dir ckpt --checkpoint-every 100 --resume

`--checkpoint-dir` writes a checkpoint at every training epoch's end (before validation) and, with
`--checkpoint-every N`, after every N-th training step mid-epoch, keeping the newest two
(training.checkpoint: what is in one, how it is written atomically); `--resume` continues from the newest
complete one, exactly where it was, with any --workers and world size (training.runstate: how the
records continue).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import loaders
from feedrate import network
from feedrate.errors import CliParser, FeedrateError, run_cli
from feedrate.manifest import Manifest
from feedrate.progress import progress
from loaders.stagetimes import stage_times
from training import results
from training.checkpoint import dataset_digest
from training.data import close_loaders, prepare
from training.device import DEVICES, device_line, resolve_device
from training.distributed import DEFAULT_TIMEOUT_S, Group, Topology, plan_epochs, sum_counters
from training.interrupts import Interrupts
from training.models import ARCHS, Stepper
from training.output import open_output
from training.runinfo import describe, now, phase, process_record, rank_info, summary_lines
from training.runstate import (
    Carry,
    Keeper,
    Resume,
    RunState,
    find_resume,
    frozen,
    join_ranks,
    part_record,
    rest_plan,
)
from training.stages import between
from training.timing import BatchTime, Clock, EpochStats, EpochTimer, combine_ranks
from training.trace import Step, trace_path, traced

PROG = "train.py"
EXIT_INTERRUPTED = 130
OnBatch = Callable[[EpochTimer, BatchTime], None]  # called after each batch's step


def get_args_parser() -> argparse.ArgumentParser:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    p = CliParser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=formatter)
    p.add_argument("--loader", default="torchvision", help=f"one of: {', '.join(loaders.available())}")
    p.add_argument("--data", default="data/shards", help="dataset root: path, file://, s3:// or cos://")
    p.add_argument("--epochs", type=int, default=1, help="training epochs, each followed by validation")
    p.add_argument("--batch-size", type=int, default=256, help="samples per batch")
    p.add_argument("--workers", type=int, default=2, help="the loader's CPU workers (see README, Loaders)")
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
    p.add_argument("--skip-bad", action="store_true", help="skip bad samples (counted in run.json, named)")
    p.add_argument(
        "--no-verify", dest="verify", action="store_false", help="no sha256 checks (run.json says so)"
    )
    p.add_argument(
        "--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S", help="torchrun: peer wait"
    )
    p.add_argument("--checkpoint-dir", type=Path, default=None, metavar="DIR", help="write checkpoints here")
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        metavar="N",
        help="also checkpoint after every N-th training batch (default: at training epoch ends only)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from DIR's newest checkpoint (none: start afresh)"
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
    verify: bool = True
    checkpoint_dir: Path | None = None
    checkpoint_every: int | None = None
    resume: bool = False

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
            ("--seed", self.seed, 0),
            ("--max-batches", self.max_batches, 1),
            ("--checkpoint-every", self.checkpoint_every, 1),
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
        for flag, given in (("--checkpoint-every", self.checkpoint_every), ("--resume", self.resume)):
            if given is not None and given is not False and self.checkpoint_dir is None:
                raise FeedrateError(f"{flag} needs --checkpoint-dir DIR")


def run_epoch(
    loader: loaders.Loader,
    planned: int,
    step: Step,
    clock: Clock,
    desc: str,
    on_batch: OnBatch | None = None,
    bar: bool = True,
    interrupts: Interrupts | None = None,
    may_end_early: bool = False,
) -> EpochStats:
    """Feed `planned` batches of `loader` to `step`, timing each; `on_batch(timer, batch)` after each.

    `bar=False` keeps the progress bar off (every rank but 0 under torchrun). `interrupts`: a signal
    ends the batch loop at once, never the clean-up after it. `may_end_early`: with --skip-bad a loader
    that skipped samples may run out before `planned` batches; the epoch then ends there.
    """
    timer = EpochTimer(clock)
    before = stage_times(loader)  # cumulative: this epoch's stages are the difference (training.stages)
    batches: Iterator | None = None
    interrupts = interrupts or Interrupts()  # not entered: installs nothing, only keeps the modes

    def next_batch() -> Any:
        nonlocal batches
        if batches is None:
            batches = iter(loader)  # may start worker processes: part of the first batch's wait
        return next(batches)

    try:
        quiet = {} if bar else {"disable": True}
        with progress(total=planned, desc=desc, unit="batch", **quiet) as shown, interrupts.immediate():
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
                # A signal's own raise can be lost (an at-fork hook swallows it when a DataLoader starts
                # its workers): the note it left is checked after every batch.
                interrupts.check()
        after = stage_times(loader)  # before the workers stop
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()  # a capped epoch's workers stop now, outside the timed span and the immediate block
    return timer.stats(between(before, after))


def train(cfg: TrainConfig, interrupts: Interrupts) -> int:
    """One run: device and process group, loaders, the epochs; returns the exit code (0 or 130)."""
    topology = Topology.from_env(os.environ)
    device = resolve_device(cfg.device, cfg.workers, topology)
    if topology.is_main:
        print(f"{PROG}: {device_line(device, cfg.device, topology)}", flush=True)
    group = Group.start(topology, device, cfg.dist_timeout)
    try:
        resume = group.setup(lambda: find_resume(cfg, say if group.is_main else lambda line: None))
        if len(set(group.gather(resume and resume.checkpoint.path.name))) > 1:
            group.fail(f"the ranks found different checkpoints in {cfg.checkpoint_dir}; is it shared?")
        out, manifest, made = group.setup(lambda: prepare(cfg, group, device, resume))
        with interrupts.deferred():  # from here on only check() raises: clean-ups run to their end
            try:
                status, doc = run_epochs(cfg, group, device, out, manifest, made, interrupts, resume)
            finally:
                close_loaders(made)  # persistent workers stop while no signal can break in
            for line in summary_lines(out, doc, status) if out is not None else []:
                say(line)
    finally:
        with interrupts.deferred():
            group.close()
    return EXIT_INTERRUPTED if status == "interrupted" else 0


def say(line: str) -> None:
    print(f"{PROG}: {line}", flush=True)


def run_epochs(
    cfg: TrainConfig,
    group: Group,
    device: torch.device,
    out: Path | None,
    manifest: Manifest,
    made: dict[str, loaders.Loader],
    interrupts: Interrupts,
    resume: Resume | None = None,
) -> tuple[str, dict[str, Any]]:
    """The epoch loop, each training epoch followed by validation; (status, run.json as written).

    `out` is None on every rank but 0: those write nothing and their document stays a stub. `resume`:
    the checkpoint to continue from (training.runstate says how the records continue).
    """
    # Set-up: a signal stops it at once, as it stops the loaders' set-up.
    with interrupts.immediate():
        plans = plan_epochs(
            group,
            {split: manifest.splits[split].samples for split in made},
            {split: (loader.samples, len(loader)) for split, loader in made.items()},
            cfg.batch_size,
            cfg.max_batches,
        )
        plan = {split: p.batches[group.rank] for split, p in plans.items()}
        ranks = group.gather(rank_info(group, device))
        total_steps = cfg.epochs * plan["train"]
        stepper = Stepper(
            cfg.arch,
            len(manifest.class_names),
            device,
            lr=cfg.lr,
            batch_size=cfg.batch_size * group.world_size,
            total_steps=total_steps,
            amp=cfg.amp,
            channels_last=cfg.channels_last,
            emulate=cfg.emulate,
            distributed=group.distributed,
            first_step=resume.schedule_step(total_steps) if resume else 0,
        )
        clock = Clock(torch.cuda.synchronize if device.type == "cuda" else None)
        trace = trace_path(os.environ, group.rank)

        def stats_now() -> dict[str, dict[str, int]]:
            return {split: loader.stats() for split, loader in made.items()}

        if resume is None:
            group.setup(lambda: open_output(out))  # a rank-0 failure here (read-only --out) stops every rank
            run = RunState({"epochs": []})
            if out is not None:  # rank 0
                run.doc = describe(asdict(cfg), out, manifest, stepper, made, plans, group, ranks)
        else:
            run = RunState.resume_into(resume, stepper, group, device)  # model, optimiser, generators
            if group.is_main:
                say(f"resuming from {resume.describe()}")
        doc = run.doc
        rank_counters = group.gather(stats_now())
        settings = frozen(cfg, dataset_digest(manifest.to_json()))
        keeper = None
        if cfg.checkpoint_dir is not None:
            keeper = Keeper(
                cfg.checkpoint_dir, cfg.checkpoint_every, group, stepper, settings, out, cfg.workers
            )

    def save(status: str) -> None:
        if out is None:
            return
        doc["status"] = status
        doc["finished"] = now()
        current = rank_counters if group.distributed else [stats_now()]
        doc["counters"] = sum_counters([run.counters, *current])  # and a resumed run's earlier processes'
        if group.distributed and doc.get("distributed"):  # as of the last epoch's end: after a signal no
            doc["distributed"]["rank_counters"] = rank_counters  # rank gathers again
        if keeper is not None:
            doc["checkpoints"] = keeper.summary()
        doc["summary"] = combine_ranks(run.trained)
        results.write_json_atomic(out / results.RUN_JSON_NAME, doc)

    def epoch_of(split: str, epoch: int, step: Step, planned: int, log_batch: OnBatch | None) -> EpochStats:
        tag = f"epoch {epoch}/{cfg.epochs} {'train' if split == 'train' else 'val'}"
        stepped = traced(step, trace, group.rank, split, epoch)
        stats = run_epoch(
            made[split], planned, stepped, clock, tag, log_batch, group.is_main, interrupts, cfg.skip_bad
        )
        interrupts.check()  # no rank starts a collective after a signal it has seen
        run.note_first_batch(stats)  # a resumed run's first batch: resume_s
        return stats

    def train_epoch(epoch: int, carry: Carry | None) -> dict[str, Any]:
        """Epoch `epoch`'s training (the rest of it after `carry`), its CSV row and run.json entry, and
        the epoch-end checkpoint."""
        done, planned, dropped = 0, plan["train"], 0
        if carry is not None:
            done = carry.batches
            rest = rest_plan(group, made["train"], done, cfg.batch_size, cfg.max_batches)
            planned, dropped = rest.batches[group.rank], rest.dropped
            if doc.get("resumed"):
                doc["resumed"][-1]["resumed_epoch"] = rest.as_dict()
        total = done + planned
        before = stage_times(made["train"])

        def log_batch(timer: EpochTimer, batch: BatchTime) -> None:
            row = batch if carry is None else carry.shift(batch)
            log.batch(epoch, timer.start if carry is None else carry.ranks[0].start, row, total)
            run.step += 1
            if keeper is not None and keeper.due(run.step, row.index, total):
                interrupts.check()  # no collective after a signal; one during the save waits for its end
                with interrupts.deferred():
                    part = timer.stats(between(before, stage_times(made["train"])))
                    keeper.mid_epoch(run, log, epoch, row.index, part, carry, made["train"], stats_now())

        tr = epoch_of("train", epoch, stepper.train_step, planned, log_batch)
        tr_ranks = group.gather(tr)
        whole = tr_ranks if carry is None else join_ranks(carry.ranks, tr_ranks)
        accuracy = stepper.take_accuracy(group.all_sum)
        log.epoch(results.TRAIN_EPOCH, epoch, whole[0], *accuracy)
        run.trained.append(whole)
        record = phase(whole, accuracy, cfg.workers)
        if carry is not None:
            here = part_record(tr_ranks, done + 1, cfg.workers, group.world_size)
            # An elastic resume deals the remainder to the ranks anew; the equal-steps rule then leaves
            # out up to one sample a rank of it (training.distributed), counted here and in resumed[].
            record["parts"] = [*carry.parts, here | {"dropped": dropped}]
        entry = {"epoch": epoch, "train": record, "val": None}
        doc["epochs"].append(entry)
        interrupts.check()
        if keeper is not None:
            with interrupts.deferred():
                keeper.epoch_end(run, log, epoch, total, stats_now())
            interrupts.check()
        return entry

    at = None if resume is None else resume.csv_position  # a resumed CSV is cut there, then appended to
    log = group.setup(lambda: results.NoLog() if out is None else results.CsvLog(out / results.CSV_NAME, at))
    with log, interrupts.deferred():
        status = "failed"
        try:
            if resume is None:  # a resumed CSV holds the first process's rows 10/11 already
                for d in made["train"].downloads + made["test"].downloads:
                    log.download(d.split, d.start, d.loading, d.duration, d.samples)
            elif out is not None:  # this process's downloads, device, code: its `resumed` entry
                whole = {split: p.as_dict() for split, p in plans.items()}
                process = process_record(asdict(cfg), stepper, made, plans, group, ranks)
                run.note_resume(resume, log.cut_rows, cfg.workers, group, whole, process)
            save("running")
            for epoch in range(run.epoch, cfg.epochs + 1):
                carry = run.take_carry(epoch)
                if carry is not None:
                    made["train"].load_state_dict(carry.loader_state)  # then set_epoch: loaders.resume
                for loader in made.values():
                    loader.set_epoch(epoch)
                if run.validate_first:  # resumed at this epoch's validation: its training is in the doc
                    run.validate_first = False
                    entry = doc["epochs"][-1] if out is not None else {}
                else:
                    entry = train_epoch(epoch, carry)
                group.broadcast_buffers(stepper.module)
                va = epoch_of("test", epoch, stepper.eval_step, plan["test"], None)
                va_ranks, rank_counters = map(list, zip(*group.gather((va, stats_now())), strict=True))
                accuracy = stepper.take_accuracy(group.all_sum)
                log.epoch(results.VAL_EPOCH, epoch, va, *accuracy)
                entry["val"] = phase(va_ranks, accuracy, cfg.workers)
                save("running")
            status = "complete"
        except BaseException as exc:
            # Any failure after a signal is that stop: a peer that stopped on it breaks a collective.
            if isinstance(exc, KeyboardInterrupt) or interrupts.requested():
                status = "interrupted"
            else:
                if isinstance(exc, Exception):  # a bug, or a peer that died (its collective failed)
                    doc["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:1000]
                raise
        finally:
            save(status)  # deferred: a second Ctrl-C must not tear run.json
    return status, doc


def main(argv: list[str] | None = None) -> int:
    """train.py's command line. The signal handler comes first: a SIGTERM while the loaders are built (a
    remote split being copied to a temporary directory) runs the same clean-ups as one in the loop."""
    with Interrupts() as interrupts:
        return run_cli(
            PROG, lambda: train(TrainConfig(**vars(get_args_parser().parse_args(argv))), interrupts)
        )


if __name__ == "__main__":
    sys.exit(main())
