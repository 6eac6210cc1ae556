"""Where a loader is in its epoch, as data: the contract of `state_dict()` / `load_state_dict()`.

Every loader can say, between two batches, which samples of the split it has handed out in the epoch
under way, and can be told to serve only the rest of that epoch. The state is plain JSON-able data (no
pickle: a checkpoint is a file someone may hand you), validated when it is loaded.

Why a set of samples and not a single position: a position ("the first k samples of the epoch's
order") describes a loader that consumes one global order front to back, as the map-style loaders do
(the torchvision and tensor loaders deal one (seed, epoch) permutation to ranks in turn; after t steps
of R ranks the first t*B*R samples of it are gone, whatever the worker count). A streaming loader that
reads each shard once and shuffles through a buffer per reader consumes samples from many places of
the split at once, so no prefix describes it. The consumed set describes both, costs one bit per sample
(6 KB for CIFAR-10's 50,000), merges across ranks by a bitwise OR, and does not depend on how many
workers or ranks made it -- which is what lets a run resume with other counts (elastic): the rest of
the epoch is the split minus the set, dealt out again to whoever reads now.

The state of one loader (`state_dict()`), all keys required:
- `version`: STATE_VERSION;
- `loader`: the backend's name (`loaders.BACKENDS`), `split`, `seed`, `epoch` (the epoch under way);
- `dataset`: which data it is of (`loaders.shards.dataset_key`: the encoding and a hash of the manifest),
  so the state of one dataset is refused by a loader of another that has as many samples;
- `total`: the samples of the split (all ranks), which sizes the bitmap;
- `consumed`: the bitmap (`encode`), set for every sample of the split handed out in this epoch -- by
  this rank's loader, or (after `merge`) by any rank, plus what an earlier resume carried in;
- `count`: the number of bits set (a check on the bitmap);
- `workers`, `world_size`: the counts that made it;
- `exact`: backend data that lets the same counts continue with exactly the batches an uninterrupted
  run would have given (per rank: `merge` keeps a list, `ranks`); ignored when the counts differ.

A loader given a state (`load_state_dict`) serves, when its next epoch is that `epoch`, only the samples
not in `consumed`, dealt out to the current ranks and workers; `samples` and `len()` then describe that
remainder (this rank's part of it), and every later epoch is whole again.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from feedrate.errors import FeedrateError

STATE_VERSION = 1
KEYS = (
    "version",
    "loader",
    "dataset",
    "split",
    "seed",
    "epoch",
    "total",
    "consumed",
    "count",
    "workers",
    "world_size",
)
MAX_TOTAL = 1 << 31  # samples in a split: a bitmap of at most 256 MiB


def encode(consumed: np.ndarray) -> str:
    """A boolean array as text: its bits packed (numpy order), base64."""
    return base64.b64encode(np.packbits(np.asarray(consumed, dtype=bool)).tobytes()).decode("ascii")


def decode(text: str, total: int) -> np.ndarray:
    """The boolean array of `total` samples that `encode` wrote; a FeedrateError when it is not one."""
    size = -(-total // 8)
    if not isinstance(text, str) or len(text) > 4 * -(-size // 3) + 4:  # checked before decoding it
        raise FeedrateError(
            f"loader state: `consumed` is not the base64 of {size} bytes (a split of {total} samples)"
        )
    try:
        packed = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, AttributeError):
        raise FeedrateError("loader state: `consumed` is not base64 text") from None
    if len(packed) != -(-total // 8):
        raise FeedrateError(
            f"loader state: `consumed` holds {len(packed) * 8} bits; a split of {total} samples needs "
            f"{-(-total // 8)} bytes"
        )
    bits = np.unpackbits(np.frombuffer(packed, dtype=np.uint8), count=total).astype(bool)
    return bits


class Progress:
    """The samples of a split one loader has handed out in the epoch under way (one bit each).

    `start(epoch, carried)` begins an epoch (`carried`: what a resumed state says was consumed before);
    `mark(ids)` records a batch as it is handed out (ids: sample numbers in the split, any int array); a
    sample handed out twice in one epoch is an error there and then (about a microsecond a batch), so no
    loader can break "exactly once" without a word. `dataset` goes into the state (`check`).
    """

    def __init__(self, total: int, dataset: str = "") -> None:
        if not 0 < total < MAX_TOTAL:
            raise FeedrateError(f"a split of {total} samples cannot be tracked; accepted: 1..{MAX_TOTAL - 1}")
        self.total = total
        self.dataset = dataset
        self.epoch = 0
        self.consumed = np.zeros(total, dtype=bool)

    def start(self, epoch: int, carried: np.ndarray | None = None) -> None:
        self.epoch = epoch
        self.consumed = np.zeros(self.total, dtype=bool) if carried is None else carried.copy()

    def mark(self, ids: np.ndarray | Sequence[int]) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        seen = self.consumed[ids]
        if seen.any() or len(np.unique(ids)) != len(ids):
            ordered = np.sort(ids)
            again = int(ids[seen][0]) if seen.any() else int(ordered[1:][np.diff(ordered) == 0][0])
            raise FeedrateError(f"sample {again} was handed out twice in epoch {self.epoch} (a loader bug)")
        self.consumed[ids] = True

    @property
    def count(self) -> int:
        return int(self.consumed.sum())

    def state(
        self, loader: str, split: str, seed: int, workers: int, world_size: int, exact: Any = None
    ) -> dict[str, Any]:
        """This loader's state (the module docstring's keys)."""
        return {
            "version": STATE_VERSION,
            "loader": loader,
            "dataset": self.dataset,
            "split": split,
            "seed": seed,
            "epoch": self.epoch,
            "total": self.total,
            "consumed": encode(self.consumed),
            "count": self.count,
            "workers": workers,
            "world_size": world_size,
            "exact": exact,
        }


def check(
    state: Mapping[str, Any], loader: str, split: str, seed: int, total: int, dataset: str | None = None
) -> np.ndarray:
    """Validate a state for a loader of this kind and split; its consumed bitmap.

    A one-line FeedrateError names the first key that is missing, malformed, or differs from what this
    loader reads (a checkpoint of another loader, split, seed or dataset cannot be continued here)."""
    if not isinstance(state, Mapping):
        raise FeedrateError(f"loader state is a {type(state).__name__}; expected a mapping")
    missing = [k for k in KEYS if k not in state]
    if missing:
        raise FeedrateError(f"loader state lacks {', '.join(missing)}")
    if state["version"] != STATE_VERSION:
        raise FeedrateError(f"loader state version {state['version']!r}; this feedrate reads {STATE_VERSION}")
    wanted = [("loader", loader), ("split", split), ("seed", seed), ("total", total)]
    if dataset is not None:  # None: the caller has checked the dataset itself (train.py: the manifest)
        wanted.insert(1, ("dataset", dataset))
    for key, want in wanted:
        if state[key] != want:
            raise FeedrateError(f"loader state is for {key} {state[key]!r}; this loader reads {key} {want!r}")
    for key, low in (("epoch", 0), ("count", 0), ("workers", 0), ("world_size", 1)):
        value = state[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise FeedrateError(f"loader state: {key} {value!r} must be an integer >= {low}")
    consumed = decode(state["consumed"], total)
    if int(consumed.sum()) != state["count"]:
        raise FeedrateError(
            f"loader state: `consumed` has {int(consumed.sum())} samples set; its count says {state['count']}"
        )
    return consumed


def merge(states: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The job's state from every rank's (rank order): the consumed bitmaps OR-ed (ranks' parts are
    disjoint; what an earlier resume carried in, every rank holds alike), `exact` kept per rank in
    `ranks`. The ranks must agree on everything else."""
    if not states:
        raise FeedrateError("no loader states to merge")
    first = states[0]
    for state in states[1:]:
        for key in (k for k in KEYS if k not in ("consumed", "count")):
            if state[key] != first[key]:
                raise FeedrateError(
                    f"ranks disagree on the loader state's {key}: {first[key]!r} vs {state[key]!r}"
                )
    total = first["total"]
    bitmaps = [decode(s["consumed"], total) for s in states]
    union = np.logical_or.reduce(bitmaps)
    return dict(first) | {
        "consumed": encode(union),
        "count": int(union.sum()),
        "exact": None,
        "ranks": [s.get("exact") for s in states],
    }


def remaining(order: np.ndarray, consumed: np.ndarray | None) -> np.ndarray:
    """`order` (sample numbers) without the consumed ones, in the same order."""
    if consumed is None:
        return order
    return order[~consumed[order]]


def exact_for(state: Mapping[str, Any], rank: int) -> Any:
    """Rank `rank`'s `exact` data: from `ranks` in a merged state, else the state's own (one loader)."""
    ranks = state.get("ranks")
    if isinstance(ranks, list):
        return ranks[rank] if 0 <= rank < len(ranks) else None
    return state.get("exact")


def same_counts(state: Mapping[str, Any], workers: int, world_size: int) -> bool:
    """Whether a state was made with these worker and rank counts (then `exact` may be used)."""
    return state["workers"] == workers and state["world_size"] == world_size
