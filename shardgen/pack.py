"""Build a dataset: source -> shards + index files + source batches -> manifest, on any storage.

Order matters: everything is written to a local staging directory first, each finished file is
published through the storage layer (a temp name + rename locally, a managed upload remotely), and the
manifest goes last. An interrupted run therefore leaves no manifest, and loaders refuse a root without
one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from feedrate import __version__
from feedrate.cifar import BATCH_DIR, BATCH_FILES
from feedrate.errors import FeedrateError
from feedrate.files import sha256_of
from feedrate.manifest import (
    ENCODINGS,
    MANIFEST_NAME,
    SPLITS,
    FileEntry,
    Manifest,
    ShardEntry,
    SplitEntry,
)
from feedrate.progress import progress
from feedrate.storage import Store, open_store
from shardgen.source import load_source
from shardgen.writer import WrittenShard, encoder_settings, write_split

# 2,500 samples per shard: 20 train + 4 test shards for CIFAR-10, 3.5-12 MB each depending on the
# encoding. Enough shards to keep 2-8 loader workers busy with whole shards; large enough that one GET
# per shard costs nothing next to the transfer (thousands of samples per request against an object
# store's ~10-50 ms first-byte latency).
DEFAULT_SHARD_SIZE = 2_500


@dataclass(frozen=True)
class ShardgenConfig:
    """Validated shardgen settings; invalid values raise FeedrateError naming the accepted ones."""

    dest: str
    source: str = "auto"
    fmt: str = "jpg"
    shard_size: int = DEFAULT_SHARD_SIZE
    splits: tuple[str, ...] = SPLITS
    seed: int = 0
    overwrite: bool = False
    endpoint_url: str | None = None
    cache_dir: Path = Path("data")
    synthetic_train: int = 50_000
    synthetic_test: int = 10_000
    allow_download: bool = True

    def __post_init__(self) -> None:
        if self.fmt not in ENCODINGS:
            raise FeedrateError(f"unknown format {self.fmt!r}; accepted: {', '.join(ENCODINGS)}")
        if self.seed < 0:
            raise FeedrateError(f"--seed {self.seed} must be >= 0")
        if self.shard_size < 1:
            raise FeedrateError(f"--shard-size {self.shard_size} must be a positive sample count")
        bad = [s for s in self.splits if s not in SPLITS]
        if bad or not self.splits:
            raise FeedrateError(f"unknown split {', '.join(bad) or '(none)'}; accepted: {', '.join(SPLITS)}")
        if self.synthetic_train < 1 or self.synthetic_test < 1:
            raise FeedrateError(
                f"synthetic sizes must be >= 1 (train={self.synthetic_train}, test={self.synthetic_test})"
            )


def _stale_names(store: Store, keep: set[str]) -> list[str]:
    """Shards and index files of an earlier build that the new one does not contain."""
    stale = []
    for split in SPLITS:
        for name in store.list(f"{split}-"):
            if "/" not in name and name.endswith((".tar", ".idx")) and name not in keep:
                stale.append(name)
    return stale


@contextlib.contextmanager
def _staging_room(staging: Path) -> Iterator[None]:
    """A full staging area (the system's temporary directory) is the user's to fix: say where it is
    and how to choose another, instead of a bare "No space left on device"."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        raise FeedrateError(
            f"cannot write the staging files under {staging}: {exc.strerror}; set TMPDIR to a directory "
            "with room for the dataset"
        ) from None


def build(cfg: ShardgenConfig) -> Manifest:
    """Write the dataset described by `cfg`; returns the manifest (already published)."""
    store = open_store(cfg.dest, endpoint_url=cfg.endpoint_url)
    store.check_writable()
    if store.exists(MANIFEST_NAME) and not cfg.overwrite:
        raise FeedrateError(
            f"{store.url} already holds a complete dataset ({MANIFEST_NAME} present); "
            "pass --overwrite to replace it"
        )

    with tempfile.TemporaryDirectory(prefix="shardgen-") as tmp:
        staging = Path(tmp)
        with _staging_room(staging):
            data = load_source(
                cfg.source,
                cfg.cache_dir,
                staging / "source",
                synthetic_train=cfg.synthetic_train,
                synthetic_test=cfg.synthetic_test,
                seed=cfg.seed,
                allow_download=cfg.allow_download,
            )
        for note in data.notes:
            print(note, file=sys.stderr, flush=True)
        if cfg.overwrite and store.exists(MANIFEST_NAME):
            store.delete(MANIFEST_NAME)  # the root is incomplete from here until the new manifest

        shard_dir = staging / "shards"
        shard_dir.mkdir()
        total = sum(len(data.splits[s][1]) for s in cfg.splits)
        splits: dict[str, SplitEntry] = {}
        # Local destinations need no upload bar; remote ones show bytes sent by the managed transfers.
        quiet = {"disable": True} if store.is_local else {}
        uploading = progress(unit="B", unit_scale=True, desc=f"uploading to {store.url}", **quiet)
        with progress(total=total, unit="img", desc=f"packing {cfg.fmt}") as bar, uploading:

            def publish(shard: WrittenShard) -> None:
                store.put_file(shard.path, shard.name, callback=uploading.update)
                store.put_file(shard.index_path, shard.index_name, callback=uploading.update)
                shard.path.unlink()
                shard.index_path.unlink()

            for split in cfg.splits:
                images, labels = data.splits[split]
                with _staging_room(staging):
                    written = write_split(
                        split,
                        images,
                        labels,
                        shard_dir,
                        cfg.fmt,
                        cfg.shard_size,
                        cfg.seed,
                        on_shard=publish,
                        on_sample=bar.update,
                    )
                splits[split] = SplitEntry(
                    samples=sum(s.samples for s in written),
                    shards=[
                        ShardEntry(
                            name=s.name,
                            samples=s.samples,
                            bytes=s.bytes,
                            sha256=s.sha256,
                            index=FileEntry(s.index_name, s.index_bytes, s.index_sha256),
                        )
                        for s in written
                    ],
                )

        batches = []
        for name in BATCH_FILES:
            path = data.batch_dir / name
            store.put_file(path, f"{BATCH_DIR}/{name}")
            batches.append(FileEntry(f"{BATCH_DIR}/{name}", path.stat().st_size, sha256_of(path)))

        keep = {s.name for e in splits.values() for s in e.shards}
        keep |= {s.index.name for e in splits.values() for s in e.shards}
        for name in _stale_names(store, keep):
            store.delete(name)

        manifest = Manifest(
            kind=data.kind,
            source=data.source,
            encoding=cfg.fmt,
            class_names=data.class_names,
            splits=splits,
            source_batches=batches,
            seed=cfg.seed,
            shard_size=cfg.shard_size,
            encoder=encoder_settings(cfg.fmt),
            created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            feedrate_version=__version__,
        )
        store.write_bytes(MANIFEST_NAME, manifest.to_json().encode())
    if store.counters.retries:
        # Never silent: a flaky link shows up here even though every file arrived whole.
        print(
            f"shardgen: {store.counters.retries} request(s) to {store.url} were retried "
            "(the network or the endpoint faltered; every upload completed)",
            file=sys.stderr,
            flush=True,
        )
    return manifest
