"""Local files: one way to write atomically, one way to make a write durable, and one way to hash.

Every file feedrate publishes locally (shards, indexes, manifests, run.json, cache copies, downloads)
is written under a temporary name in its target directory and renamed into place, so a reader sees the
whole file or none. The file is fsynced before the rename (a crash keeps no torn file under the final
name); where the rename itself must survive a power cut (run.json, a checkpoint), `sync_dir=True` also
fsyncs the directory that holds the new name, without which the rename may be lost though the data
is on disk. The temporary name starts with a dot and ends in `.tmp`, so a crash leaves
something recognisable. Published files get the permissions an ordinary `open()` would give (0666 less
the umask): `mkstemp`'s 0600 would hide a shared dataset or cache from other users.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

_UMASK_LOCK = threading.Lock()
_UMASK: int | None = None


def umask() -> int:
    """The process umask, without changing it.

    `os.umask` can only be read by setting it, and a set from one thread while another creates a file
    gives that file (or, with an unlucky overlap, the whole process from then on) a umask of 0. Linux
    shows the umask in /proc/self/status; elsewhere it is read once, under a lock, at first use.
    """
    global _UMASK
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        if _UMASK is None:
            mask = os.umask(0o022)
            os.umask(mask)
            _UMASK = mask
        return _UMASK


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by its path (a directory's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes | memoryview, sync_dir: bool = False) -> None:
    """Write `data` to `path` (in place, not atomically) and fsync it; with `sync_dir`, its directory too.

    For files that get their final name some other way (the checkpoint's temporary directory, renamed
    whole: training.checkpoint)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if sync_dir:
        fsync_path(Path(path).parent)


@contextlib.contextmanager
def atomic_path(target: Path, sync_dir: bool = False) -> Iterator[Path]:
    """A temporary path beside `target`; renamed onto `target` when the block succeeds, removed if not.

    The parent directory is created. The caller writes the temporary file however it likes (a stream,
    an SDK download, a tar writer). The file is fsynced before the rename; `sync_dir` fsyncs the parent
    directory after it, so that the rename too survives a crash (module docstring).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # on disk before it has the final name (a crash keeps no torn file)
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, target)
        if sync_dir:
            fsync_path(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def inside(root: Path, name: str) -> Path:
    """`root / name`, refusing a name that would land outside `root` (`..`, an absolute path, a link out).

    Names that become local paths often come from data (a manifest on someone's bucket): this is the
    last check before such a name touches the file system. Raises ValueError naming the value.
    """
    root = Path(root)
    target = root / name
    base = root.resolve()
    resolved = target.resolve()
    if resolved != base and base not in resolved.parents:
        raise ValueError(f"{name!r} would be written outside {root}; expected a name inside it")
    return target


def atomic_write_bytes(target: Path, data: bytes, sync_dir: bool = False) -> None:
    """Write `data` to `target` atomically (`atomic_path`, `sync_dir` as there)."""
    with atomic_path(target, sync_dir) as tmp:
        tmp.write_bytes(data)


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file (`sha256` as manifests record it; `md5` for CIFAR-10's published sums)."""
    with open(path, "rb") as f:
        if algorithm == "md5":
            return hashlib.file_digest(f, lambda: hashlib.md5(usedforsecurity=False)).hexdigest()
        return hashlib.file_digest(f, algorithm).hexdigest()


def sha256_of(path: Path) -> str:
    """The sha256 of a file, as manifests record it."""
    return file_digest(path, "sha256")


def md5_of(path: Path) -> str:
    """The md5 of a file (CIFAR-10's published checksums are md5)."""
    return file_digest(path, "md5")
