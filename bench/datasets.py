"""The bench's datasets: synthetic ones built once and reused, and their copies on the local endpoint."""

from __future__ import annotations

from pathlib import Path

from feedrate.manifest import MANIFEST_NAME, Manifest


def ensure_dataset(root: Path, fmt: str, train: int, test: int) -> None:
    """A synthetic dataset of `train` samples in `fmt` at `root`, reused when it already matches."""
    from shardgen import ShardgenConfig, build

    manifest_path = root / MANIFEST_NAME
    if manifest_path.exists():
        manifest = Manifest.from_json(manifest_path.read_text())
        if manifest.encoding == fmt and manifest.splits["train"].samples == train:
            return
    build(
        ShardgenConfig(
            dest=str(root),
            source="synthetic",
            fmt=fmt,
            synthetic_train=train,
            synthetic_test=test,
            overwrite=True,
            allow_download=False,
        )
    )


def upload(root: Path, url: str) -> None:
    """Copy the local dataset at `root` to `url`, the manifest last (as shardgen publishes: its presence
    says the dataset is complete). The store's endpoint and keys come from the environment."""
    from feedrate.storage import open_store

    store = open_store(url)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    for path in files:
        store.put_file(path, path.relative_to(root).as_posix())
    store.put_file(root / MANIFEST_NAME, MANIFEST_NAME)


def train_shards(root: Path) -> int:
    """How many training shards the dataset at `root` has."""
    manifest = Manifest.from_json((root / MANIFEST_NAME).read_text())
    return len(manifest.splits["train"].shards)
