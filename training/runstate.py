"""A run's place and records across checkpoints: what train.py saves, and how a resumed run continues.

`RunState` is what the epoch loop carries besides the model: the global step, the epochs trained (each
rank's stats, for the summary), the loaders' counters of earlier processes, run.json's document, and --
in a resumed run -- the part of the interrupted epoch done before its checkpoint (`Carry`). `Keeper`
writes checkpoints (training.checkpoint) from it: every `--checkpoint-every` training steps mid-epoch
(never at an epoch's last batch: the epoch-end checkpoint follows at once) and at each training epoch's
end, before validation. Every rank takes part in the one gather a checkpoint needs (its loader state,
the epoch's figures and accuracy counts so far, its generators, its counters); rank 0 merges and
writes, and every rank then learns whether the write succeeded (`Group.setup`), so a full disk stops
the job with one error line and no rank waits on a peer that failed.

How an epoch split by a kill and a resume is recorded -- the batches after the checkpoint and before the
kill are discarded (their samples are trained again after the resume), so neither the CSV nor run.json
counts them:
- CSV: the rows after the checkpoint's offset are cut (run.json's `resumed[].discarded_batch_rows`
  says how many batch rows that was); the resumed epoch's batch rows continue the epoch's numbering
  (value1 from the checkpoint's batch + 1, value2 the epoch's batches as now planned) and cumulative
  times (the part before the checkpoint, then this process's), with `start` the epoch's first start;
  its type 0 row adds both parts up. So every figure is of the batches kept, and the time between the
  kill and the resume is in none of them.
- run.json: the epoch's `train` record holds the job's figures over both parts (each part's first
  batch left out of AU, as a start-up) and `parts`, each part's own figures with its batches, workers
  and world size. `resumed` lists every resume: when, from which checkpoint (name, step, epoch, batch,
  phase), the old and new workers and world size, the batch rows cut, and the time it took
  (`find_s` finding and verifying the checkpoint, `load_s` reading it into the model and optimiser,
  the loader states, plans and generators, `first_batch_s` the first fetch, `resume_s` their sum:
  checkpoint load to first batch; building the loaders, which any start pays, is not in it), and what
  that process ran on (training.runinfo.process_record: device, versions, git, machine, its downloads
  -- never CSV rows again: the CSV keeps the first process's -- and under torchrun how it shared out).
  A resumed epoch's remainder is dealt to the new ranks afresh; under DDP the equal-steps rule may then
  leave out up to one sample a rank of it, counted in its part's `dropped` and `resumed_epoch.dropped`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import loaders
from feedrate.errors import FeedrateError
from loaders.resume import merge
from training import checkpoint
from training.checkpoint import Checkpoint
from training.distributed import Group, SplitPlan, sum_counters
from training.models import Stepper
from training.results import CsvLog, NoLog
from training.runinfo import now
from training.timing import BatchTime, EpochStats, across_ranks, join_parts


def stats_of(saved: Mapping[str, Any]) -> EpochStats:
    """EpochStats from a checkpoint's dict (checked by training.checkpoint.validate)."""
    return EpochStats(**{k: saved[k] for k in (*checkpoint.STATS_FIELDS, "stages")})


def part_record(ranks: Sequence[EpochStats], first: int, workers: int, world_size: int) -> dict[str, Any]:
    """One process's part of an epoch for run.json's `parts`: from which batch, its counts, its figures."""
    return {"first_batch": first, "workers": workers, "world_size": world_size, **across_ranks(ranks)}


def join_ranks(before: Sequence[EpochStats], after: Sequence[EpochStats]) -> list[EpochStats]:
    """Each rank's epoch from two parts (`join_parts`); with another world size, rank r's parts where it
    had them (the job's sums are right either way; per-rank figures are then approximate)."""
    count = max(len(before), len(after))
    return [
        join_parts(before[r] if r < len(before) else None, after[r] if r < len(after) else None)
        for r in range(count)
    ]


@dataclass
class Carry:
    """The part of an epoch done before the checkpoint a run resumed from."""

    batches: int  # training steps of the epoch done (every rank ran as many)
    ranks: list[EpochStats]  # each saved rank's figures of that part
    parts: list[dict[str, Any]]  # run.json `parts` of the epoch so far
    accuracy: list[int]  # top-1 hits, top-5 hits, samples, summed over the ranks
    loader_state: dict[str, Any]  # the train loader's merged state (loaders.resume)

    def shift(self, batch: BatchTime) -> BatchTime:
        """A batch row of the resumed part as the epoch's: numbered and timed after the carried part."""
        before = self.ranks[0]
        return batch._replace(
            index=self.batches + batch.index,
            cum_loading=before.loading + batch.cum_loading,
            cum_duration=before.duration + batch.cum_duration,
        )


@dataclass
class Resume:
    """The checkpoint a run resumes from, and the seconds spent finding and verifying it."""

    checkpoint: Checkpoint
    found_s: float

    @property
    def meta(self) -> dict[str, Any]:
        return self.checkpoint.meta

    @property
    def csv_position(self) -> tuple[int, str]:
        """(offset, sha256) of the CSV as the checkpoint saw it (training.results.CsvLog resume_at)."""
        return self.meta["csv"]["offset"], self.meta["csv"]["sha256"]

    def describe(self) -> str:
        meta = self.meta
        return (
            f"{self.checkpoint.path} (epoch {meta['epoch']}, {meta['batch']} batches done, {meta['phase']}; "
            f"step {meta['step']})"
        )

    def schedule_step(self, total: int) -> int:
        saved = self.meta["schedule"]
        return checkpoint.schedule_step(saved["step"], saved["total"], total)


def frozen(cfg: Any, dataset: str | None) -> dict[str, Any]:
    """The settings a resume may not change (training.checkpoint.FROZEN), from train.py's config; the
    dataset left out when it is not known yet (None)."""
    values = {key: getattr(cfg, key) for key in checkpoint.FROZEN.values() if key != "dataset"}
    return values | ({"dataset": dataset} if dataset is not None else {})


def find_resume(cfg: Any, say: Callable[[str], None]) -> Resume | None:
    """What --checkpoint-dir and --resume ask for: the checkpoint to resume from, or None (a fresh run).

    Without --resume, a DIR that holds checkpoints is an error (a fresh run would mix its own into
    them). With it, an empty or missing DIR is a fresh start, said in one line, so that a scheduler can
    relaunch one command line. The checkpoint's settings must be this run's (FROZEN, but the dataset,
    checked once the manifest is read) and --out, if given, its output directory. Without --out, that
    directory (a path read from the checkpoint) must hold a run.json naming this --checkpoint-dir: a
    moved or handed-in checkpoint directory continues only where --out says."""
    if cfg.checkpoint_dir is None:
        return None
    directory = Path(cfg.checkpoint_dir)
    if directory.exists() and not directory.is_dir():
        raise FeedrateError(f"--checkpoint-dir {directory} exists and is not a directory")
    if not cfg.resume:
        if checkpoint.checkpoints(directory):
            raise FeedrateError(
                f"--checkpoint-dir {directory} holds checkpoints of an earlier run; pass --resume to "
                "continue it, or choose an empty directory"
            )
        return None
    t0 = time.perf_counter()
    found = checkpoint.latest(directory, say)
    if found is None:
        say(f"no checkpoint in {directory}; starting afresh")
        return None
    checkpoint.check_unchanged(found.meta["config"], frozen(cfg, None), found.path)
    saved_out = Path(found.meta["out"])
    if cfg.out is not None and Path(cfg.out).resolve() != saved_out.resolve():
        raise FeedrateError(
            f"--out {cfg.out}: a resumed run continues in its checkpoint's output directory {saved_out}; "
            "leave --out out or pass that one"
        )
    if not (saved_out / "train.csv").is_file():
        raise FeedrateError(f"--resume: the checkpoint's output directory {saved_out} has no train.csv")
    if cfg.out is None and not names_checkpoints(saved_out, directory):
        # meta["out"] is a path from a file: its train.csv would be cut and its run.json replaced
        raise FeedrateError(
            f"--resume: the checkpoint's output directory {saved_out} holds no run.json naming "
            f"--checkpoint-dir {directory}; pass --out {saved_out} to continue the run there"
        )
    return Resume(found, time.perf_counter() - t0)


def names_checkpoints(out: Path, directory: Path) -> bool:
    """Whether `out`'s run.json names `directory` as its --checkpoint-dir (the run's own results)."""
    try:
        saved = json.loads((Path(out) / "run.json").read_text())["config"]["checkpoint_dir"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return isinstance(saved, str) and Path(saved).resolve() == Path(directory).resolve()


def restartable(cfg: Any, out: Path | None) -> bool:
    """Whether --out may be started over although it holds results: --resume found no checkpoint and the
    results there are this command's own (its run.json names the same --checkpoint-dir), left by a run
    killed before its first checkpoint -- so not complete, never resumed, and no epoch recorded (run.json
    records an epoch only after that epoch's checkpoint). Anything else is kept: --overwrite replaces it."""
    if not (cfg.resume and cfg.checkpoint_dir is not None and out is not None):
        return False
    try:
        doc = json.loads((Path(out) / "run.json").read_text())
        early = doc.get("status") != "complete" and not doc.get("resumed") and not doc.get("epochs")
    except (OSError, ValueError, AttributeError):
        return False
    return early and names_checkpoints(Path(out), Path(cfg.checkpoint_dir))


@dataclass
class RunState:
    """Where the run is, and what it has recorded, for checkpoints and the epoch loop."""

    doc: dict[str, Any]  # run.json so far (a stub on every rank but 0)
    step: int = 0  # training steps of the job so far, over every process of the run
    epoch: int = 1  # the epoch to run next (or to finish: `carry`, `validate_first`)
    trained: list[list[EpochStats]] = field(default_factory=list)  # [epoch][rank], completed epochs
    counters: dict[str, dict[str, int]] = field(default_factory=dict)  # earlier processes' I/O
    carry: Carry | None = None  # the resumed epoch's part before the checkpoint
    validate_first: bool = False  # resumed at an epoch's validation (its training was done)
    resume_started: float | None = None  # wall time the checkpoint load began (resume_s)

    @classmethod
    def resumed(cls, resume: Resume, doc_of_rank: bool) -> RunState:
        """The state a checkpoint describes (validated when it was found)."""
        meta = resume.meta
        carry = None
        if meta["phase"] == "train":
            carry = Carry(
                batches=meta["batch"],
                ranks=[stats_of(s) for s in meta["epoch_ranks"]],
                parts=list(meta["parts"]),
                accuracy=list(meta["accuracy"]),
                loader_state=meta["loader_state"],
            )
        return cls(
            doc=meta["doc"] if doc_of_rank else {"epochs": []},
            step=meta["step"],
            epoch=meta["epoch"],
            trained=[[stats_of(s) for s in ranks] for ranks in meta["trained"]],
            counters=meta["counters"],
            carry=carry,
            validate_first=meta["phase"] == "val",
        )

    @classmethod
    def resume_into(cls, resume: Resume, stepper: Stepper, group: Group, device: torch.device) -> RunState:
        """The state `resume` describes, its checkpoint loaded into the model, optimiser, scaler and
        generators (`apply`); the time this began is kept for resume_s."""
        started = time.time()
        run = cls.resumed(resume, group.is_main)
        run.resume_started = started
        apply(resume, stepper, group, device)
        if run.carry is not None and group.is_main:
            stepper.add_counts(run.carry.accuracy)  # the epoch's accuracy so far, on one rank: summed once
        return run

    def take_carry(self, epoch: int) -> Carry | None:
        """The carried part when `epoch` is the resumed one (once)."""
        carry, self.carry = (self.carry, None) if epoch == self.epoch else (None, self.carry)
        return carry

    def note_resume(
        self,
        resume: Resume,
        cut_rows: int,
        workers: int,
        group: Group,
        plans: Any,
        process: Mapping[str, Any],
    ) -> None:
        """run.json's `resumed` entry (rank 0), its timings filled in by `note_first_batch`. `process`:
        this process's own record (training.runinfo.process_record: device, versions, git, machine, its
        downloads -- logged here, not as CSV rows, which the first process's hold -- and distributed),
        as run.json's top level describes the first process's."""
        meta = resume.meta
        self.doc.setdefault("resumed", []).append(
            {
                "at": now(),
                "checkpoint": {
                    "name": resume.checkpoint.path.name,
                    "step": meta["step"],
                    "epoch": meta["epoch"],
                    "batch": meta["batch"],
                    "phase": meta["phase"],
                },
                "workers": {"old": meta["workers"], "new": workers},
                "world_size": {"old": meta["world_size"], "new": group.world_size},
                "planned_batches": plans,
                "discarded_batch_rows": cut_rows,
                "find_s": resume.found_s,
                "load_s": None,
                "first_batch_s": None,
                "resume_s": None,
            }
            | dict(process)
        )

    def note_first_batch(self, stats: EpochStats) -> None:
        """Fill in the last resume's timings from the first part it ran (once)."""
        if self.resume_started is None or stats.batches == 0 or not self.doc.get("resumed"):
            return
        entry = self.doc["resumed"][-1]
        entry["load_s"] = stats.start - self.resume_started
        entry["first_batch_s"] = stats.first_batch - stats.first_step
        entry["resume_s"] = entry["find_s"] + entry["load_s"] + entry["first_batch_s"]
        self.resume_started = None


def apply(resume: Resume, stepper: Stepper, group: Group, device: torch.device) -> dict[str, Any]:
    """Load the checkpoint into this rank's model, optimiser, scaler and generators; its tensors' other
    parts are not needed after. Every rank reads the file itself."""
    meta = resume.meta
    tensors = resume.checkpoint.tensors()
    state = tensors.get("stepper")
    if not isinstance(state, dict):
        raise FeedrateError(f"checkpoint {resume.checkpoint.path}: no training state in its tensors")
    stepper.load_state_dict(state)
    rng = tensors.get("rng")
    if not (
        isinstance(rng, list) and len(rng) == meta["world_size"] and all(isinstance(r, dict) for r in rng)
    ):
        raise FeedrateError(f"checkpoint {resume.checkpoint.path}: torch's RNG states are not one per rank")
    source = checkpoint.rank_of(meta["world_size"], group.rank)
    checkpoint.restore_rng(meta["rng"][source], rng[source], device)
    return tensors


class Keeper:
    """Writes the run's checkpoints into --checkpoint-dir (see the module docstring)."""

    def __init__(
        self,
        directory: Path,
        every: int | None,
        group: Group,
        stepper: Stepper,
        settings: Mapping[str, Any],
        out: Path | None,
        workers: int,
    ) -> None:
        self.directory = Path(directory)
        self.every = every
        self.group = group
        self.stepper = stepper
        self.settings = dict(settings)  # FROZEN values, dataset included
        self.out = None if out is None else Path(out).resolve()
        self.workers = workers
        self.saved: list[tuple[int, float]] = []  # (step, seconds) of each save by this process

    def summary(self) -> dict[str, Any]:
        """run.json's `checkpoints`: where, how often, and this process's saves and their seconds."""
        seconds = [s for _, s in self.saved]
        return {
            "dir": str(self.directory),
            "every": self.every,
            "saves": len(seconds),
            "last_step": self.saved[-1][0] if self.saved else None,
            "save_s_mean": sum(seconds) / len(seconds) if seconds else None,
            "save_s_max": max(seconds) if seconds else None,
        }

    def due(self, step: int, index: int, planned: int) -> bool:
        """Whether batch `index` of `planned` (the epoch's) at global `step` ends with a checkpoint."""
        return self.every is not None and step % self.every == 0 and index < planned

    def mid_epoch(
        self,
        run: RunState,
        log: CsvLog | NoLog,
        epoch: int,
        batch: int,
        part: EpochStats,
        carry: Carry | None,
        loader: loaders.Loader,
        counters: dict[str, dict[str, int]],
    ) -> None:
        """A checkpoint after batch `batch` of training epoch `epoch` (this process's `part` of it);
        `counters`: this rank's loaders' now."""
        mine = {"loader": loader.state_dict(), "part": asdict(part), "accuracy": self.stepper.counts()}
        self._save(run, log, epoch, batch, "train", mine | {"counters": counters}, carry)

    def epoch_end(
        self,
        run: RunState,
        log: CsvLog | NoLog,
        epoch: int,
        batches: int,
        counters: dict[str, dict[str, int]],
    ) -> None:
        """A checkpoint after epoch `epoch`'s training, before its validation."""
        self._save(run, log, epoch, batches, "val", {"counters": counters}, None)

    def _save(
        self,
        run: RunState,
        log: CsvLog | NoLog,
        epoch: int,
        batch: int,
        phase: str,
        mine: dict[str, Any],
        carry: Carry | None,
    ) -> None:
        t0 = time.perf_counter()
        mine |= {"rng": checkpoint.host_rng(), "torch_rng": checkpoint.torch_rng(self.stepper.device)}
        ranks = self.group.gather(mine)

        def write() -> None:
            if not self.group.is_main:
                return
            meta = self._meta(run, log, epoch, batch, phase, ranks, carry)
            tensors = {"stepper": self.stepper.state_dict(), "rng": [r["torch_rng"] for r in ranks]}
            checkpoint.save(self.directory, run.step, tensors, meta)

        self.group.setup(write)  # a failed write on rank 0 stops every rank, with one error line
        self.saved.append((run.step, time.perf_counter() - t0))

    def _meta(
        self,
        run: RunState,
        log: CsvLog | NoLog,
        epoch: int,
        batch: int,
        phase: str,
        ranks: list[dict[str, Any]],
        carry: Carry | None,
    ) -> dict[str, Any]:
        offset, digest = log.mark()
        assert self.out is not None, "rank 0 has the output directory"
        meta: dict[str, Any] = {
            "saved": now(),
            "epoch": epoch,
            "batch": batch,
            "phase": phase,
            "config": self.settings,
            "workers": self.workers,
            "world_size": self.group.world_size,
            "schedule": {"step": self.stepper.schedule_step, "total": self.stepper.total_steps},
            "out": str(self.out),
            "csv": {"offset": offset, "sha256": digest},
            "doc": run.doc,
            "trained": [[asdict(s) for s in epoch_ranks] for epoch_ranks in run.trained],
            "counters": sum_counters([run.counters, *(r["counters"] for r in ranks)]),
            "rng": [r["rng"] for r in ranks],
            "loader_state": None,
        }
        if phase == "train":
            part = [stats_of(r["part"]) for r in ranks]
            before = carry.ranks if carry is not None else []
            first = (carry.batches if carry is not None else 0) + 1
            here = part_record(part, first, self.workers, self.group.world_size)
            meta |= {
                "loader_state": merge([r["loader"] for r in ranks]),
                "epoch_ranks": [asdict(s) for s in join_ranks(before, part)],
                # rank 0's counts hold the carried part's already (added when the run resumed)
                "accuracy": [sum(r["accuracy"][i] for r in ranks) for i in range(3)],
                "parts": [*(carry.parts if carry else []), here],
            }
        return meta


def rest_plan(
    group: Group, loader: loaders.Loader, done: int, batch_size: int, max_batches: int | None
) -> SplitPlan:
    """The plan of a resumed epoch's remainder: the loaders' parts after `load_state_dict` in equal steps,
    --max-batches counting the `done` batches before the checkpoint."""
    from training.distributed import plan_split

    parts = group.gather((loader.samples, len(loader)))
    cap = None if max_batches is None else max(0, max_batches - done)
    return plan_split(sum(p for p, _ in parts), parts, batch_size, equal_steps=True, max_batches=cap)
