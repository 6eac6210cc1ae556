"""Where shardgen's data comes from: `--source auto | synthetic | PATH`.

`auto` is the official CIFAR-10 archive (md5-verified download, cached), falling back to synthetic data
with one loud warning when it cannot be had; `PATH` is a user's archive or batch directory in CIFAR's
pickle layout (`feedrate.cifar`), validated; `synthetic` is `feedrate.synthetic`.
"""

from __future__ import annotations

import shutil
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from feedrate import synthetic
from feedrate.cifar import BATCH_DIR, BATCH_FILES, CifarData, SourceError, read_batch_dir
from feedrate.files import atomic_path, md5_of
from feedrate.progress import progress

# Facts of the official release (https://www.cs.toronto.edu/~kriz/cifar.html).
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
DOWNLOAD_TIMEOUT_S = 30.0
SOURCES_ACCEPTED = "auto, synthetic, or a path to cifar-10-python.tar.gz or a cifar-10-batches-py directory"


# -- the official archive ----------------------------------------------------------------------------


def download_cifar10(cache_dir: Path, url: str = CIFAR10_URL) -> Path:
    """Download the official archive into `cache_dir`, verify its md5, and return its path.

    The file is written under a temporary name and renamed only after the checksum matches, so a
    broken download never poses as the real data set.
    """
    target = cache_dir / CIFAR10_ARCHIVE
    with (
        atomic_path(target) as tmp,
        urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response,
        open(tmp, "wb") as out,
    ):
        total = int(response.headers.get("Content-Length") or 0) or None
        with progress(total=total, unit="B", unit_scale=True, desc="CIFAR-10 download") as bar:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
                bar.update(len(chunk))
        out.flush()
        digest = md5_of(tmp)
        if digest != CIFAR10_MD5:
            raise SourceError(f"download from {url} has md5 {digest}, expected {CIFAR10_MD5}")
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
