"""The loader protocol every backend honours, and what they share.

Iterating a loader yields `(images, labels)` already on the target device: images float32 NCHW,
normalised with the CIFAR-10 mean/std; labels int64. `len()` is the number of batches per epoch,
`samples` the number of samples per epoch, and `set_epoch(e)` reseeds the shuffle. The training loop
never looks inside a backend and never branches on its name.

A loader that has to fetch data before it can serve batches (the torchvision baseline reading batches
from S3, a cache filled up front) records each fetch as a `Download`, which train.py writes as the seed
CSV's type 10 (training data) and 11 (validation data) rows.

Optional: `stage_times()`, where the loader's time goes per stage of its data path (the contract is
loaders.stagetimes: cumulative `{"wall": {...}, "cpu": {...}}` seconds per stage, summed over readers,
an absent stage meaning "not separable"). The training loop reads it before and after each epoch
through `loaders.stagetimes.stage_times`, which treats a loader without it as reporting no stages; so
it is documented on `Loader` but not declared there (`isinstance(x, Loader)` does not require it).
The torchvision, wds and tensor loaders implement it.

Checkpoints: `state_dict()` says, between two batches, which samples of the split the loader has handed
out in the epoch under way, and `load_state_dict(state)` makes the loader's next pass over that epoch
serve only the rest, dealt to the current ranks and workers (the contract, and why it is a set of
samples rather than one position: loaders.resume). train.py saves the states of every rank, merged,
in its checkpoints and gives them back on `--resume` (training.checkpoint).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from feedrate.errors import FeedrateError
from feedrate.manifest import SPLITS

# CIFAR-10 per-channel statistics of the training set (0-1 scale).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CROP_PADDING = 4


@dataclass(frozen=True)
class LoaderConfig:
    """What a loader is asked to serve. Validated here so every backend gets sane values."""

    data: str  # dataset root written by shardgen: a path, file://, s3:// or cos:// URL
    split: str  # "train" or "test"
    batch_size: int
    train: bool  # True: shuffle + augment (crop-pad-4, flip); False: fixed order, no augmentation
    workers: int = 0
    device: str = "cpu"  # a torch device string: "cpu", "cuda", "cuda:0"
    seed: int = 0
    endpoint_url: str | None = None
    cache_dir: str | None = None
    rank: int = 0  # torch.distributed rank / world size: each rank gets a disjoint part
    world_size: int = 1
    options: dict[str, Any] = field(default_factory=dict)  # backend-specific knobs
    # The highest epoch number the caller will give set_epoch (train.py: --epochs, its epochs being
    # 1..N), None when it does not say: a loader that prepares the next epoch while one ends (dali builds
    # its pipeline, wds reads its first shards) prepares none past this one.
    last_epoch: int | None = None

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise FeedrateError(f"unknown split {self.split!r}; accepted: {', '.join(SPLITS)}")
        if self.batch_size < 1:
            raise FeedrateError(f"batch size {self.batch_size} must be >= 1")
        if self.workers < 0:
            raise FeedrateError(f"workers {self.workers} must be >= 0")
        if self.last_epoch is not None and self.last_epoch < 0:
            raise FeedrateError(f"last epoch {self.last_epoch} must be >= 0 (or None: not said)")
        if not (0 <= self.rank < self.world_size):
            raise FeedrateError(f"rank {self.rank} is outside world size {self.world_size}")


def last_epoch(cfg: LoaderConfig, epoch: int) -> bool:
    """Whether `epoch` is the last the caller said it will read (never, when it did not say)."""
    return cfg.last_epoch is not None and epoch >= cfg.last_epoch


@dataclass
class Download:
    """One up-front fetch of a split's data (a CSV row of type 10 or 11)."""

    split: str
    start: float  # Unix time when it began
    loading: float  # seconds spent fetching bytes
    duration: float  # seconds in all, including preparing the data in memory
    samples: int


@runtime_checkable
class Loader(Protocol):
    """What train.py and the benchmarks rely on."""

    samples: int  # samples per epoch (this rank's part)
    downloads: list[Download]  # up-front fetches made when the loader was built
    decode_device: str  # where images are decoded/augmented: "cpu", "cuda", "mixed"
    # How the loader planned its reads from storage and why: {"source": "local" | "option" | "measured"
    # | FEEDRATE_NET, ...}, with the link and the depth or concurrency chosen (run.json, the bench)
    prefetch_plan: dict[str, Any]
    # Whether every shard / batch file is checked against the manifest's sha256 before use (the default;
    # False: the `verify=false` option was given). For run.json; stats()["verified_bytes"] counts them.
    verify: bool

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[Any, Any]]: ...

    def set_epoch(self, epoch: int) -> None: ...

    def stats(self) -> dict[str, int]:
        """Counters for run.json: bytes_read, requests, retries, cache_hits, cache_misses, skipped,
        verified_bytes (loaders.stats.LoaderStats)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Where the loader is in its epoch, as JSON-able data (loaders.resume's keys): the samples it has
        handed out in the epoch under way, and what lets the same counts continue exactly."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Serve only the rest of `state`'s epoch when that epoch is next read (`samples` and `len()`
        then describe this rank's part of the rest); a state of another loader, split, seed or dataset,
        or a malformed one, is a FeedrateError naming the bad value."""
        ...

    # Optional, not declared (see the module docstring): stage_times() -> Snapshot | None, cumulative
    # wall and CPU seconds per stage since the loader was built (loaders.stagetimes).

    def close(self) -> None:
        """Release what the loader holds now rather than at garbage collection: worker processes, a
        pipeline, a temporary copy of the data. Safe to call twice."""
        ...


def batches_for(samples: int, batch_size: int) -> int:
    """Batches per epoch when the last batch may be partial (never padded with repeats)."""
    return -(-samples // batch_size)
