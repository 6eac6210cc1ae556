"""train.py as one of several processes: torchrun's environment, the process group, a few collectives.

torchrun (or any launcher that sets torch's `env://` variables: RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) starts one process per device, on one node or many. Each
process reads that environment once (`Topology.from_env`) and joins the process group (`Group.start`):
gloo on the CPU, nccl on CUDA, with a timeout, so a peer that never arrives (or dies) ends the run with
an error instead of a hang.

With WORLD_SIZE unset or 1 there is no process group at all: `Group` then answers every collective
locally (a gather of one, a sum of one), so the training loop has one code path and a single-process run
does exactly what it did before distributed training existed.

How an epoch is shared out (`plan_split`): each loader gives its rank a disjoint part. Training steps
are collective (DDP all-reduces gradients), so every rank must run the same number of batches or the
ranks with more would wait forever for the others. The policy is to drop: every rank runs the fewest
batches any rank has (an all-reduced minimum) and leaves the rest of its part for that epoch. What that
costs is counted (`dropped`: at most one sample a rank, as every loader deals parts that differ by at
most one), and so would be repeats a loader added to even the parts out (`padded`: none does since
checkpoints came, as a repeat breaks exactly-once; the field stays 0). Validation has no collective per
batch, so each rank evaluates its whole part and only the counts are summed.

What that means for a train.py run (`make train-cifar NPROC=2`, or by hand):

    torchrun --standalone --nproc_per_node=2 train.py --loader tensor ...
    torchrun --nnodes=2 --node_rank=K --rdzv_endpoint=HOST:PORT --nproc_per_node=N train.py ...

- DDP over gloo on the CPU, nccl on CUDA (each process takes cuda:LOCAL_RANK: training.device).
  `--batch-size` is per process; the learning rate scales with the global batch (batch size x
  processes). `--dist-timeout` bounds the start and every collective.
- Every loader gives each rank a disjoint part of each split (LoaderConfig.rank / world_size); run.json
  counts what the equal-steps rule left out (`distributed.splits.train.dropped`) and the repeats a loader
  added (`padded`). Validation runs with the unwrapped model, after rank 0's BatchNorm statistics are
  broadcast (`Group.broadcast_buffers`), so every rank evaluates the same model.
- Accuracy is summed over the ranks (hits and samples), so it is the whole epoch's. Only rank 0 prints
  and writes the CSV (its own batches' times) and run.json (every rank's epoch times under `ranks`, the
  job's figures beside them: training.timing.across_ranks). Other ranks print nothing but errors; a
  set-up error on any rank is reported once, by rank 0 (`Group.setup`).
- A signal (torchrun forwards Ctrl-C / SIGTERM to every rank) still leaves a complete CSV and a run.json
  marked interrupted on rank 0: after a signal no rank starts another collective (training.interrupts).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from feedrate.errors import EXIT_USAGE, FeedrateError

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 600.0  # a collective (or the start) that waits this long means a peer is gone
LAUNCHER_HINT = "launch with torchrun, which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT"


@dataclass(frozen=True)
class Topology:
    """Where this process stands among the run's processes (all defaults: a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the index of this process on its node: picks its GPU
    local_world_size: int = 1  # processes on this node: they share its CPU cores

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise FeedrateError(f"WORLD_SIZE={self.world_size} must be >= 1")
        if not 0 <= self.rank < self.world_size:
            raise FeedrateError(f"RANK={self.rank} must be in 0..{self.world_size - 1} (WORLD_SIZE)")
        if self.local_world_size < 1:
            raise FeedrateError(f"LOCAL_WORLD_SIZE={self.local_world_size} must be >= 1")
        if not 0 <= self.local_rank < self.local_world_size:
            raise FeedrateError(
                f"LOCAL_RANK={self.local_rank} must be in 0..{self.local_world_size - 1} (LOCAL_WORLD_SIZE)"
            )

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints and writes results."""
        return self.rank == 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Topology:
        """The topology torchrun's variables describe; unset variables mean a single process.

        LOCAL_WORLD_SIZE, when a launcher leaves it out, is taken to be WORLD_SIZE (every process on this
        node), the safe guess for sharing CPU cores.
        """

        def number(name: str, default: int) -> int:
            text = environ.get(name, "").strip()
            if not text:
                return default
            try:
                return int(text)
            except ValueError:
                raise FeedrateError(f"{name}={text!r} is not an integer; {LAUNCHER_HINT}") from None

        world_size = number("WORLD_SIZE", 1)
        topology = cls(
            rank=number("RANK", 0),
            world_size=world_size,
            local_rank=number("LOCAL_RANK", 0),
            local_world_size=number("LOCAL_WORLD_SIZE", world_size),
        )
        if topology.distributed:
            missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(name, "").strip()]
            if missing:
                raise FeedrateError(
                    f"WORLD_SIZE={world_size} but {' and '.join(missing)} unset; {LAUNCHER_HINT}"
                )
        return topology


class Group:
    """The run's processes and the collectives train.py needs; local answers for a single process.

    Collectives run on `device`: the CPU for gloo, this rank's GPU for nccl.
    """

    def __init__(
        self, topology: Topology, backend: str | None = None, device: torch.device | None = None
    ) -> None:
        self.topology = topology
        self.backend = backend
        self.device = device or torch.device("cpu")

    @property
    def rank(self) -> int:
        return self.topology.rank

    @property
    def world_size(self) -> int:
        return self.topology.world_size

    @property
    def is_main(self) -> bool:
        return self.topology.is_main

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @classmethod
    def start(cls, topology: Topology, device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> Group:
        """Join the process group (gloo on the CPU, nccl on CUDA); nothing at all for a single process.

        `timeout_s` bounds the start (waiting for the other processes) and every later collective.
        """
        if not topology.distributed:
            return cls(topology)
        backend = "nccl" if device.type == "cuda" else "gloo"
        checks = {"gloo": dist.is_gloo_available, "nccl": dist.is_nccl_available}
        built = [name for name, check in checks.items() if dist.is_available() and check()]
        if backend not in built:
            accepted = built or ["none"]
            raise FeedrateError(
                f"backend {backend!r} (for device {device}) is not in this torch build; "
                f"available: {', '.join(accepted)}"
            )
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        try:
            dist.init_process_group(
                backend,
                rank=topology.rank,
                world_size=topology.world_size,
                timeout=dt.timedelta(seconds=timeout_s),
                device_id=device if device.type == "cuda" else None,
            )
        except (RuntimeError, ValueError) as exc:  # DistStoreError, DistNetworkError are RuntimeErrors
            reason = " ".join(str(exc).split())[:300]
            raise FeedrateError(
                f"rank {topology.rank} of {topology.world_size} could not join the {backend} process group "
                f"at {where} within {timeout_s:g} s: {reason}"
            ) from None
        return cls(topology, backend, device if backend == "nccl" else torch.device("cpu"))

    def close(self) -> None:
        """Leave the process group (a no-op for a single process)."""
        if self.distributed:
            with contextlib.suppress(RuntimeError, ValueError):
                dist.destroy_process_group()
            self.backend = None

    # -- collectives (every rank must call the same ones in the same order) ---------------------------
    def gather(self, value: T) -> list[T]:
        """Every rank's `value` (picklable), indexed by rank, on every rank."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of `tensor` over the ranks (a new tensor on `tensor`'s device)."""
        if not self.distributed:
            return tensor.clone()
        total = tensor.detach().to(self.device, copy=True)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total.to(tensor.device)

    def broadcast_buffers(self, module: torch.nn.Module | None) -> None:
        """Rank 0's buffers (BatchNorm running statistics) to every rank, so all evaluate one model."""
        if not self.distributed or module is None:
            return
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)

    def agree(self, error: str | None) -> None:
        """Every rank says whether its setup failed; when any did, every rank stops.

        Rank 0 raises the first failure as a FeedrateError (its own, or "rank k: ..." for another's), the
        other ranks exit with code 2 silently, so N processes do not print N copies of one mistake and
        none is left waiting for a peer that is gone.
        """
        failed = [(rank, text) for rank, text in enumerate(self.gather(error)) if text is not None]
        if not failed:
            return
        rank, text = failed[0]
        self.fail(text if rank == 0 or not self.distributed else f"rank {rank}: {text}")

    def fail(self, message: str) -> None:
        """Stop every rank on a failure they all know of: rank 0 reports it, the others exit quietly."""
        if self.is_main:
            raise FeedrateError(message)
        raise SystemExit(EXIT_USAGE)

    def setup(self, build: Callable[[], T]) -> T:
        """`build()` on every rank, then `agree` on whether it failed on any (see `agree`).

        A bug (any exception but a FeedrateError) keeps its traceback on the rank it happened on.
        """
        try:
            result = build()
        except FeedrateError as exc:
            self.agree(str(exc))
            raise  # not reached: agree() raised
        except Exception as exc:
            with contextlib.suppress(FeedrateError, SystemExit):
                self.agree(f"{type(exc).__name__}: {exc}")
            raise
        self.agree(None)
        return result


@dataclass(frozen=True)
class SplitPlan:
    """How one split's epoch is shared out among the ranks (see the module docstring)."""

    samples: int  # in the split
    rank_samples: tuple[int, ...]  # each rank's part (what its loader serves; the parts cover the split once)
    rank_lengths: tuple[int, ...]  # each rank's batches per epoch (its loader's len())
    batches: tuple[int, ...]  # the batches each rank runs
    padded: int  # repeated samples the loaders added to even the parts out
    dropped: int  # samples of the ranks' parts left out so that every rank runs as many batches

    def as_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "rank_samples": list(self.rank_samples),
            "rank_loader_batches": list(self.rank_lengths),
            "rank_batches": list(self.batches),
            "padded": self.padded,
            "dropped": self.dropped,
        }


def plan_split(
    samples: int,
    parts: Sequence[tuple[int, int]],
    batch_size: int,
    equal_steps: bool,
    max_batches: int | None = None,
) -> SplitPlan:
    """The plan for a split of `samples` whose ranks' loaders serve `parts` = [(samples, len()), ...].

    `equal_steps` (training): every rank runs the fewest batches any rank has; a rank's batches are full
    but for its last, so a rank that stops after b batches leaves max(0, part - b * batch_size)
    samples, counted as dropped. Otherwise (validation) each rank runs all of its own batches.
    `max_batches` caps both (the user's cap is not counted as dropped). `padded` is what the parts hold
    beyond the split: the repeats a padding sampler adds.
    """
    rank_samples = tuple(part for part, _ in parts)
    lengths = tuple(length for _, length in parts)
    if equal_steps:
        fewest = min(lengths)
        runs = [fewest] * len(parts)
        dropped = sum(max(0, part - fewest * batch_size) for part in rank_samples)
    else:
        runs, dropped = list(lengths), 0
    if max_batches is not None:
        runs = [min(run, max_batches) for run in runs]
    return SplitPlan(
        samples=samples,
        rank_samples=rank_samples,
        rank_lengths=lengths,
        batches=tuple(runs),
        padded=max(0, sum(rank_samples) - samples),
        dropped=dropped,
    )


def plan_epochs(
    group: Group,
    samples: Mapping[str, int],
    parts: Mapping[str, tuple[int, int]],
    batch_size: int,
    max_batches: int | None,
) -> dict[str, SplitPlan]:
    """Every split's plan (`plan_split`; training in equal steps), from every rank's `parts`: this rank's
    (samples, len()) per split. A rank left with no batch of a split stops every rank with an error."""
    gathered = group.gather(dict(parts))
    plans = {
        split: plan_split(
            total,
            [part[split] for part in gathered],
            batch_size,
            equal_steps=split == "train",
            max_batches=max_batches,
        )
        for split, total in samples.items()
    }
    for split, plan in plans.items():
        if min(plan.batches) < 1:
            group.fail(
                f"rank {plan.batches.index(0)} of {group.world_size} gets no {split} samples (the split has "
                f"{plan.samples}, the ranks' parts: {', '.join(map(str, plan.rank_samples))}); "
                "run fewer processes"
            )
    return plans


def sum_counters(per_rank: Sequence[Mapping[str, Mapping[str, int]]]) -> dict[str, dict[str, int]]:
    """The loaders' counters (split -> name -> count) of every rank, added up: the job's I/O."""
    total: dict[str, dict[str, int]] = {}
    for counters in per_rank:
        for split, values in counters.items():
            into = total.setdefault(split, {})
            for name, value in values.items():
                into[name] = into.get(name, 0) + value
    return total
