"""Helpers the test modules share (fixtures are in conftest.py): the DALI skip mark, datasets whose pixels
say which sample they are, and the faults table of the fault-injection runs (`make test-faults`, printed
by conftest.py).

Imported as `tests.helpers` everywhere, so that one module object (and one pytest stash key) exists.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from feedrate.cifar import CLASS_NAMES, write_batch_dir
from loaders import LoaderConfig, unavailable
from loaders.streaming import WdsLoader
from shardgen import ShardgenConfig, build

# -- optional backends -----------------------------------------------------------------------------
# The loaders' own probe (packages found, nothing imported: cheap at collection), so that the tests skip
# exactly when `make bench` and the GPU check would, and say the same reason.
DALI_UNAVAILABLE = unavailable("dali", "cpu")
needs_dali = pytest.mark.skipif(
    DALI_UNAVAILABLE is not None, reason=f"DALI cannot run here: {DALI_UNAVAILABLE}"
)


# -- coded datasets ---------------------------------------------------------------------------------
TRAIN, TEST = 25, 7  # samples: small enough to build fast, odd so batches and shards end partial


def coded_images(n: int, labels: np.ndarray) -> np.ndarray:
    """Images whose pixels say what they are: channel 0 = 20*label + 10, channels 1-2 = the index."""
    images = np.empty((n, 32, 32, 3), dtype=np.uint8)
    idx = np.arange(n)
    images[..., 0] = (20 * labels + 10)[:, None, None]
    images[..., 1] = (idx % 256)[:, None, None]
    images[..., 2] = (idx // 256 + 100)[:, None, None]
    return images


def build_coded(
    dest: Path, fmt: str, shard_size: int, train: int = TRAIN, test: int = TEST, url: str | None = None
) -> Path:
    """A lossless dataset (raw or png) of coded images, written by shardgen from CIFAR batches, at
    `dest` or at `url` (then `dest` only holds the source batches)."""
    rng = np.random.default_rng(7)
    splits = {}
    for name, n in (("train", train), ("test", test)):
        labels = rng.integers(0, 10, n)
        splits[name] = (coded_images(n, labels), labels)
    source = dest.parent / f"{dest.name}-src" / "cifar-10-batches-py"
    write_batch_dir(source, splits, CLASS_NAMES, "coded")
    build(ShardgenConfig(dest=url or str(dest), source=str(source), fmt=fmt, shard_size=shard_size))
    return dest


def config(data: str | Path, **kw: object) -> LoaderConfig:
    """A wds loader config for `data` that yields keys with each batch (batch 4, training split)."""
    base: dict = {"split": "train", "batch_size": 4, "train": True, "options": {"keys": True}}
    base.update(kw)
    return LoaderConfig(data=str(data), **base)


def epoch(loader: WdsLoader, e: int = 0) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor]]:
    """Epoch `e` read whole: (keys, image batches, label batches)."""
    loader.set_epoch(e)
    keys, images, labels = [], [], []
    for x, y, k in loader.iter_keyed():
        keys += k
        images.append(x)
        labels.append(y)
    return keys, images, labels


def fresh_process_output(code: str) -> list[str]:
    """What `code` prints, split into words, run by this Python in a fresh process from the repository
    root: for what only a process that has run nothing yet shows (torch's per-thread defaults)."""
    root = Path(__file__).parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    return out.stdout.split()


def all_keys(n: int = TRAIN, split: str = "train") -> set[str]:
    """The keys of the first `n` samples of `split`: what exactly one pass must deliver."""
    return {f"{split}_{i:06d}" for i in range(n)}


# -- the faults table (`make test-faults`) ----------------------------------------------------------
@dataclass
class Outcome:
    """What one fault-injection run came to."""

    path: str  # the part of the data path under test, e.g. "wds loader (s3)"
    fault: str  # Fault.label
    injected: int  # faults the proxy served
    result: str  # "survived" | "failed cleanly" | "unclean"
    lost: int  # samples missing, duplicated or foreign in what the run delivered
    retries: int  # retries the run's counters recorded


RESULTS = ("survived", "failed cleanly", "unclean")


@dataclass
class FaultTally:
    """Outcomes collected over a test session, printed as one table at its end (conftest.py)."""

    outcomes: list[Outcome] = field(default_factory=list)

    def add(self, outcome: Outcome) -> None:
        if outcome.result not in RESULTS:
            raise ValueError(f"unknown result {outcome.result!r}; accepted: {', '.join(RESULTS)}")
        self.outcomes.append(outcome)

    def table(self) -> str:
        head = (
            "path",
            "fault",
            "injected",
            "survived",
            "failed cleanly",
            "unclean",
            "samples lost",
            "retries",
        )
        rows: dict[tuple[str, str], list[int]] = {}
        for o in self.outcomes:
            row = rows.setdefault((o.path, o.fault), [0] * 6)
            row[0] += o.injected
            row[1 + RESULTS.index(o.result)] += 1
            row[4] += o.lost
            row[5] += o.retries
        total = [sum(r[i] for r in rows.values()) for i in range(6)]
        lines = [(*key, *map(str, row)) for key, row in rows.items()]
        lines.append(("total", "", *map(str, total)))
        widths = [max(len(str(x)) for x in col) for col in zip(head, *lines, strict=True)]

        def fmt(cells: tuple[str, ...]) -> str:
            left = [c.ljust(w) for c, w in zip(cells[:2], widths[:2], strict=True)]
            right = [c.rjust(w) for c, w in zip(cells[2:], widths[2:], strict=True)]
            return "  ".join(left + right)

        rule = "-" * len(fmt(head))
        return "\n".join([fmt(head), rule, *map(fmt, lines[:-1]), rule, fmt(lines[-1])])


TALLY_KEY = pytest.StashKey[FaultTally]()
