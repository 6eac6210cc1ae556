"""CIFAR-10's python-pickle layout: reading and writing `cifar-10-batches-py/`.

Every dataset feedrate builds starts from batches in CIFAR-10's python-pickle layout
(`cifar-10-batches-py/`: data_batch_1..5, test_batch, batches.meta). shardgen packs them into shards
and also keeps them at the dataset root, where the torchvision baseline reads them; so one layout
serves the real data set, a user's own data set in the same layout, and the synthetic stand-in.
Where a source comes from (download, a user's path, synthetic) is shardgen's choice (`shardgen.source`).
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from feedrate.errors import FeedrateError

BATCH_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META_FILE = "batches.meta"
BATCH_FILES = (*TRAIN_BATCHES, TEST_BATCH, META_FILE)
CLASS_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
IMAGE_SHAPE = (32, 32, 3)
SAMPLE_BYTES = 32 * 32 * 3


class SourceError(FeedrateError):
    """The CIFAR source is missing, malformed or cannot be fetched."""


@dataclass
class CifarData:
    """Images (N, 32, 32, 3) uint8 HWC and labels (N,) int64 for each split, plus provenance."""

    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    class_names: list[str]
    kind: str  # "cifar10" | "synthetic" | "custom"
    source: str  # where it came from, for the manifest
    batch_dir: Path  # the cifar-10-batches-py directory it was read from
    notes: list[str] = field(default_factory=list)


# The only globals a CIFAR batch needs: numpy's array and scalar reconstructors (Python 2 pickles - the
# official release - and numpy 1 name them under numpy.core, numpy 2 under numpy._core), and the codec
# call by which protocol-2 pickles written by Python 3 carry bytes.
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that builds dicts, lists, strings, numbers and numpy arrays, and nothing else.

    A pickle can name any importable callable and call it while it loads (`os.system`, `builtins.exec`),
    so a batch from someone else's bucket or archive is never given to `pickle.load`: every global it
    names must be one of numpy's reconstructors, or loading stops before anything is called.
    """

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("numpy.core."):
            module = "numpy._core." + module[len("numpy.core.") :]
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refused global {module}.{name} (a CIFAR batch holds only numpy arrays, lists, dicts, "
                "strings and numbers)"
            )
        return super().find_class(module, name)


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            entry = _BatchUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise SourceError(f"missing batch file {path} (expected {', '.join(BATCH_FILES)})") from None
    except pickle.UnpicklingError as exc:
        raise SourceError(f"{path} is not a CIFAR python batch: {exc}") from None
    except Exception as exc:
        raise SourceError(f"{path} is not a CIFAR python batch: {type(exc).__name__}") from None
    if not isinstance(entry, dict):
        raise SourceError(f"{path} is not a CIFAR python batch: holds a {type(entry).__name__}")
    # Batches pickled by Python 2 load with str keys; ones pickled with bytes keys keep them.
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}


def _labels(raw: object, path: Path) -> np.ndarray:
    """Labels as int64, refusing anything that is not integers already (no float truncation, no bools,
    no strings: a coerced label would silently become another class)."""
    if isinstance(raw, np.ndarray):
        if raw.dtype.kind not in "iu" or raw.ndim != 1:
            raise SourceError(
                f"{path}: labels have dtype {raw.dtype} and shape {raw.shape}; expected integers"
            )
        return raw.astype(np.int64)
    if not isinstance(raw, (list, tuple)):
        raise SourceError(f"{path}: labels are a {type(raw).__name__}; expected a list of integers")
    bad = next((x for x in raw if type(x) is not int and not isinstance(x, np.integer)), None)
    if bad is not None:
        raise SourceError(f"{path}: label {bad!r} is not an integer; expected 0..N-1")
    return np.asarray(raw, dtype=np.int64)


def read_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One batch file as (images NHWC uint8, labels int64), validated."""
    entry = _load_pickle(path)
    if "data" not in entry:
        raise SourceError(f"{path} has no 'data' entry")
    labels_raw = entry.get("labels", entry.get("fine_labels"))
    if labels_raw is None:
        raise SourceError(f"{path} has no 'labels' entry")
    data = np.asarray(entry["data"])
    if data.ndim != 2 or data.shape[1] != SAMPLE_BYTES or data.dtype != np.uint8:
        raise SourceError(
            f"{path}: 'data' has shape {data.shape} and dtype {data.dtype}; "
            f"expected (N, {SAMPLE_BYTES}) uint8"
        )
    labels = _labels(labels_raw, path)
    if labels.shape != (data.shape[0],):
        raise SourceError(
            f"{path}: {labels.shape[0] if labels.ndim else 0} labels for {data.shape[0]} images"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels[(labels < 0) | (labels >= num_classes)][0])
        raise SourceError(f"{path}: label {bad} is out of range; expected 0..{num_classes - 1}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def read_meta(batch_dir: Path) -> list[str]:
    entry = _load_pickle(batch_dir / META_FILE)
    names = entry.get("label_names")
    if not isinstance(names, (list, tuple)) or not names:
        raise SourceError(f"{batch_dir / META_FILE} has no 'label_names' list")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def read_batch_dir(batch_dir: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """All splits of a cifar-10-batches-py directory: {"train": ..., "test": ...} and class names."""
    if not batch_dir.is_dir():
        raise SourceError(f"{batch_dir} is not a directory")
    missing = [name for name in BATCH_FILES if not (batch_dir / name).is_file()]
    if missing:
        raise SourceError(f"{batch_dir} lacks {', '.join(missing)} (expected {', '.join(BATCH_FILES)})")
    class_names = read_meta(batch_dir)
    parts = [read_batch(batch_dir / name, len(class_names)) for name in TRAIN_BATCHES]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    test = read_batch(batch_dir / TEST_BATCH, len(class_names))
    return {"train": train, "test": test}, class_names


def write_batch_dir(
    batch_dir: Path,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    class_names: Sequence[str],
    label: str,
) -> None:
    """Write splits in the cifar-10-batches-py layout (train spread over five batches)."""
    batch_dir.mkdir(parents=True, exist_ok=True)
    train_x, train_y = splits["train"]
    chunks = np.array_split(np.arange(len(train_y)), len(TRAIN_BATCHES))
    files = list(zip(TRAIN_BATCHES, chunks, strict=True))
    for name, idx in files:
        _write_batch(batch_dir / name, train_x[idx], train_y[idx], f"{label} {name}")
    test_x, test_y = splits["test"]
    _write_batch(batch_dir / TEST_BATCH, test_x, test_y, f"{label} test batch")
    meta = {
        "label_names": list(class_names),
        "num_cases_per_batch": len(chunks[0]),
        "num_vis": SAMPLE_BYTES,
    }
    with open(batch_dir / META_FILE, "wb") as f:
        pickle.dump(meta, f, protocol=4)


def _write_batch(path: Path, images: np.ndarray, labels: np.ndarray, label: str) -> None:
    entry = {
        "batch_label": label,
        "labels": [int(x) for x in labels],
        "data": np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), -1),
        "filenames": [f"{label.replace(' ', '_')}_{i:05d}.png" for i in range(len(images))],
    }
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=4)
