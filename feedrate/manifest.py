"""The dataset manifest: what shardgen wrote, and what every loader trusts.

`manifest.json` sits at the dataset root and is written last, so its presence means the dataset is
complete. It lists, per split, each shard with its sample count, size and sha256 (and its DALI index
file), and the CIFAR python batches the shards were made from, with their checksums.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from feedrate.errors import FeedrateError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
ENCODINGS = ("jpg", "png", "raw")
SPLITS = ("train", "test")
KINDS = ("cifar10", "synthetic", "custom")


class ManifestError(FeedrateError):
    """A manifest that is missing, unreadable, or does not describe a dataset."""


@dataclass
class FileEntry:
    """One stored file: its name relative to the dataset root, size and sha256."""

    name: str
    bytes: int
    sha256: str


@dataclass
class ShardEntry:
    """One tar shard and its DALI index."""

    name: str
    samples: int
    bytes: int
    sha256: str
    index: FileEntry


@dataclass
class SplitEntry:
    samples: int
    shards: list[ShardEntry] = field(default_factory=list)


@dataclass
class Manifest:
    kind: str
    source: str
    encoding: str
    class_names: list[str]
    splits: dict[str, SplitEntry]
    source_batches: list[FileEntry]
    seed: int
    shard_size: int
    encoder: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    feedrate_version: str = ""
    format_version: int = FORMAT_VERSION
    batch_dir: str = "cifar-10-batches-py"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST_NAME) -> Manifest:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{where} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
        try:
            version = raw["format_version"]
            if version != FORMAT_VERSION:
                raise ManifestError(
                    f"{where} has format_version {version!r}; this feedrate reads {FORMAT_VERSION}"
                )
            splits = {
                name: SplitEntry(
                    samples=int(split["samples"]),
                    shards=[
                        ShardEntry(
                            name=s["name"],
                            samples=int(s["samples"]),
                            bytes=int(s["bytes"]),
                            sha256=s["sha256"],
                            index=FileEntry(**s["index"]),
                        )
                        for s in split["shards"]
                    ],
                )
                for name, split in raw["splits"].items()
            }
            manifest = cls(
                kind=raw["kind"],
                source=raw["source"],
                encoding=raw["encoding"],
                class_names=list(raw["class_names"]),
                splits=splits,
                source_batches=[FileEntry(**f) for f in raw["source_batches"]],
                seed=int(raw["seed"]),
                shard_size=int(raw["shard_size"]),
                encoder=dict(raw.get("encoder", {})),
                created=raw.get("created", ""),
                feedrate_version=raw.get("feedrate_version", ""),
                format_version=version,
                batch_dir=raw.get("batch_dir", "cifar-10-batches-py"),
            )
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"{where} is malformed: {type(exc).__name__} {exc}") from None
        if manifest.encoding not in ENCODINGS:
            raise ManifestError(
                f"{where}: unknown encoding {manifest.encoding!r}; expected one of {ENCODINGS}"
            )
        for name, split in manifest.splits.items():
            total = sum(s.samples for s in split.shards)
            if total != split.samples:
                raise ManifestError(
                    f"{where}: split {name!r} says {split.samples} samples, its shards hold {total}"
                )
        return manifest


def load_manifest(store: Any) -> Manifest:
    """Read and validate the manifest of the dataset at `store`'s root."""
    if not store.exists(MANIFEST_NAME):
        raise ManifestError(
            f"no {MANIFEST_NAME} at {store.url}: not a complete feedrate dataset "
            "(build one with `make shards` / `python -m shardgen --dest URL`)"
        )
    return Manifest.from_json(store.read_bytes(MANIFEST_NAME).decode(), store.url_for(MANIFEST_NAME))
