"""The CIFAR-10 source: the official download, a user's file or directory, or synthetic data.

Every dataset feedrate builds starts from batches in CIFAR-10's python-pickle layout
(`cifar-10-batches-py/`: data_batch_1..5, test_batch, batches.meta). shardgen packs them into shards
and also keeps them at the dataset root, where the torchvision baseline reads them; so one layout
serves the real data set, a user's own data set in the same layout, and the synthetic stand-in.
"""

from __future__ import annotations

import hashlib
import pickle
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from feedrate.errors import FeedrateError
from feedrate.progress import progress

# Facts of the official release (https://www.cs.toronto.edu/~kriz/cifar.html).
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
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
DOWNLOAD_TIMEOUT_S = 30.0

SOURCES_ACCEPTED = "auto, synthetic, or a path to cifar-10-python.tar.gz or a cifar-10-batches-py directory"


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


def md5_of(path: Path) -> str:
    """The md5 of a file (CIFAR-10's published checksums are md5)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.md5(usedforsecurity=False)).hexdigest()


def sha256_of(path: Path) -> str:
    """The sha256 of a file, as manifests record it."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except FileNotFoundError:
        raise SourceError(f"missing batch file {path} (expected {', '.join(BATCH_FILES)})") from None
    except Exception as exc:
        raise SourceError(f"{path} is not a CIFAR python batch: {type(exc).__name__}") from None
    if not isinstance(entry, dict):
        raise SourceError(f"{path} is not a CIFAR python batch: holds a {type(entry).__name__}")
    # Batches pickled by Python 2 load with str keys; ones pickled with bytes keys keep them.
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}


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
    labels = np.asarray(labels_raw, dtype=np.int64)
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


# -- the official archive ----------------------------------------------------------------------------


def download_cifar10(cache_dir: Path, url: str = CIFAR10_URL) -> Path:
    """Download the official archive into `cache_dir`, verify its md5, and return its path.

    The file is written under a temporary name and renamed only after the checksum matches, so a
    broken download never poses as the real data set.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / CIFAR10_ARCHIVE
    fd, tmp_name = tempfile.mkstemp(prefix=".cifar10.", suffix=".part", dir=cache_dir)
    tmp = Path(tmp_name)
    try:
        with (
            urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response,
            open(fd, "wb") as out,
        ):
            total = int(response.headers.get("Content-Length") or 0) or None
            with progress(total=total, unit="B", unit_scale=True, desc="CIFAR-10 download") as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
        digest = md5_of(tmp)
        if digest != CIFAR10_MD5:
            raise SourceError(f"download from {url} has md5 {digest}, expected {CIFAR10_MD5}")
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def extract_archive(archive: Path, into: Path) -> Path:
    """Extract a cifar-10-python.tar.gz into `into`; return the cifar-10-batches-py directory."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            wanted = [m for m in members if Path(m.name).name in BATCH_FILES]
            if not wanted:
                raise SourceError(f"{archive} holds no {BATCH_DIR} batch files")
            into.mkdir(parents=True, exist_ok=True)
            for member in wanted:
                source = tar.extractfile(member)
                assert source is not None  # a regular file always has a body
                (into / BATCH_DIR).mkdir(exist_ok=True)
                with open(into / BATCH_DIR / Path(member.name).name, "wb") as out:
                    shutil.copyfileobj(source, out)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise SourceError(f"{archive} is not a readable .tar.gz: {exc}") from None
    return into / BATCH_DIR


def _cached_official(cache_dir: Path, allow_download: bool) -> Path:
    """The extracted official batches under `cache_dir`, downloading them if allowed and needed."""
    batch_dir = cache_dir / BATCH_DIR
    stamp = batch_dir / ".md5-verified"
    if stamp.is_file():
        return batch_dir
    archive = cache_dir / CIFAR10_ARCHIVE
    if not (archive.is_file() and md5_of(archive) == CIFAR10_MD5):
        if not allow_download:
            raise SourceError(f"no verified {archive}")
        archive = download_cifar10(cache_dir)
    extract_archive(archive, cache_dir)
    stamp.write_text(CIFAR10_MD5 + "\n")
    return batch_dir


def load_user_source(path: Path, scratch: Path) -> CifarData:
    """A user-supplied archive or batch directory, validated; kind is cifar10 only when md5 matches."""
    path = path.expanduser()
    notes: list[str] = []
    if path.is_file():
        if not path.name.endswith((".tar.gz", ".tgz")):
            raise SourceError(f"--source {path}: expected {SOURCES_ACCEPTED}")
        digest = md5_of(path)
        official = digest == CIFAR10_MD5
        if not official:
            notes.append(
                f"warning: {path} has md5 {digest}, not the official {CIFAR10_MD5}; "
                "treating it as a custom data set"
            )
        batch_dir = extract_archive(path, scratch)
    elif path.is_dir():
        batch_dir = path / BATCH_DIR if (path / BATCH_DIR).is_dir() else path
        official = False
    else:
        raise SourceError(f"--source {path} does not exist; expected {SOURCES_ACCEPTED}")
    splits, class_names = read_batch_dir(batch_dir)
    if not official and path.is_dir():
        official = _looks_official(batch_dir)
    return CifarData(
        splits=splits,
        class_names=class_names,
        kind="cifar10" if official else "custom",
        source=str(path),
        batch_dir=batch_dir,
        notes=notes,
    )


# md5 of each file of the official extracted release (as torchvision lists them).
OFFICIAL_FILE_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}


def _looks_official(batch_dir: Path) -> bool:
    return all(md5_of(batch_dir / name) == digest for name, digest in OFFICIAL_FILE_MD5.items())


def load_source(
    spec: str,
    cache_dir: Path,
    scratch: Path,
    *,
    synthetic_train: int = 50_000,
    synthetic_test: int = 10_000,
    seed: int = 0,
    allow_download: bool = True,
) -> CifarData:
    """Resolve `--source`: auto | synthetic | PATH.

    `auto` takes the official data set (cached under `cache_dir`, else downloaded); when it cannot be
    had it falls back to synthetic data with one loud warning line on stderr, and the dataset kind
    says `synthetic` wherever results are written.
    """
    from feedrate import synthetic

    if spec == "synthetic":
        return synthetic.make(scratch, synthetic_train, synthetic_test, seed)
    if spec == "auto":
        try:
            batch_dir = _cached_official(cache_dir, allow_download)
        except (SourceError, urllib.error.URLError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "reason", None) or exc
            print(
                f"WARNING: real CIFAR-10 unavailable ({reason}); using SYNTHETIC CIFAR-shaped data "
                "instead - accuracy figures are not CIFAR-10 figures",
                file=sys.stderr,
                flush=True,
            )
            return synthetic.make(scratch, synthetic_train, synthetic_test, seed)
        splits, class_names = read_batch_dir(batch_dir)
        return CifarData(splits, class_names, "cifar10", CIFAR10_URL, batch_dir)
    if not spec:
        raise SourceError(f"empty --source; expected {SOURCES_ACCEPTED}")
    return load_user_source(Path(spec), scratch)
