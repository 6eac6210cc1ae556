"""The dataset manifest: what shardgen wrote, and what every loader checks the data against.

`manifest.json` sits at the dataset root and is written last, so its presence means the dataset is
complete. It lists, per split, each shard with its sample count, size and sha256 (and its DALI index
file), and the CIFAR python batches the shards were made from, with their checksums.

A manifest on a shared bucket is someone else's input. Its names become local paths (cache copies,
files under a local root), its sizes become buffer allocations, so `Manifest.from_json` validates every
field before anything uses it: names are plain relative names (no `..`, no leading `/`, no backslash
or NUL, a conservative file-name pattern), sizes and counts are integers within bounds, checksums are
sha256 hex. A bad field is one line naming the field and its value.
"""

from __future__ import annotations

import json
import re
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


# One path segment: letters, digits, `_`, `-`, `.`, starting with a letter, digit or `_` (so never `.`,
# `..` or a hidden name), at most 128 characters.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
MAX_FILE_BYTES = 1 << 36  # 64 GiB: far above any shard or batch, far below an allocation that hangs a host
MAX_SAMPLES = 1 << 31
# Shards and their indexes are read whole into memory, so their sizes are bounded by what their samples
# can need: a 32x32 image in any encoding plus its label, with tar's 512-byte headers and padding, is
# under 8 KiB; 64 KiB a sample leaves room and still caps a 2,500-sample shard at 160 MB. An index line
# is under 100 bytes a sample.
MAX_SHARD_BYTES_PER_SAMPLE = 64 << 10
MAX_INDEX_BYTES_PER_SAMPLE = 1 << 10
MAX_CLASSES = 100_000
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")


def safe_name(value: object, field: str, where: str, *, segments: int = 1) -> str:
    """`value` if it is a relative name of at most `segments` plain segments, else a ManifestError.

    The check is on the text, before it meets any file system, so it holds for every platform.
    """
    accepted = f"a relative name of at most {segments} segment(s) matching {NAME_PATTERN.pattern}"
    if not isinstance(value, str):
        raise ManifestError(f"{where}: {field} is {value!r}; expected {accepted}")
    parts = value.split("/")
    if len(parts) > segments or not all(NAME_PATTERN.fullmatch(part) for part in parts):
        raise ManifestError(f"{where}: {field} is {value!r}; expected {accepted}")
    return value


def _count(value: object, field: str, where: str, low: int, high: int) -> int:
    """An integer in [low, high] (not a bool, float or string), else a ManifestError."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ManifestError(f"{where}: {field} is {value!r}; expected an integer from {low} to {high}")
    return value


def _sha256(value: object, field: str, where: str) -> str:
    if not isinstance(value, str) or not SHA256_PATTERN.fullmatch(value):
        raise ManifestError(f"{where}: {field} is {value!r}; expected 64 lowercase hex digits (sha256)")
    return value


def _file(raw: Any, field: str, where: str, segments: int = 1) -> FileEntry:
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: {field} is {raw!r}; expected an object with name, bytes, sha256")
    return FileEntry(
        name=safe_name(raw.get("name"), f"{field}.name", where, segments=segments),
        bytes=_count(raw.get("bytes"), f"{field}.bytes", where, 0, MAX_FILE_BYTES),
        sha256=_sha256(raw.get("sha256"), f"{field}.sha256", where),
    )


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
            if not isinstance(raw.get("splits"), dict):
                raise ManifestError(f"{where}: splits is {raw.get('splits')!r}; expected an object")
            splits = {}
            for name, split in raw["splits"].items():
                if name not in SPLITS:
                    raise ManifestError(f"{where}: split {name!r}; expected one of {', '.join(SPLITS)}")
                shards = []
                for i, s in enumerate(split["shards"]):
                    field = f"splits.{name}.shards[{i}]"
                    count = _count(s["samples"], f"{field}.samples", where, 1, MAX_SAMPLES)
                    index = _file(s["index"], f"{field}.index", where)
                    index_most = 64 + count * MAX_INDEX_BYTES_PER_SAMPLE
                    _count(index.bytes, f"{field}.index.bytes", where, 1, index_most)
                    most = 10240 + count * MAX_SHARD_BYTES_PER_SAMPLE  # + tar's two end blocks, padded
                    shards.append(
                        ShardEntry(
                            name=safe_name(s["name"], f"{field}.name", where),
                            samples=count,
                            bytes=_count(s["bytes"], f"{field}.bytes", where, 1, most),
                            sha256=_sha256(s["sha256"], f"{field}.sha256", where),
                            index=index,
                        )
                    )
                samples = _count(split["samples"], f"splits.{name}.samples", where, 0, MAX_SAMPLES)
                splits[name] = SplitEntry(samples=samples, shards=shards)
            class_names = raw["class_names"]
            if (
                not isinstance(class_names, list)
                or not 1 <= len(class_names) <= MAX_CLASSES
                or not all(isinstance(c, str) for c in class_names)
            ):
                raise ManifestError(
                    f"{where}: class_names is {str(class_names)[:80]}; expected a list of 1 to "
                    f"{MAX_CLASSES} strings"
                )
            batch_dir = safe_name(raw.get("batch_dir", "cifar-10-batches-py"), "batch_dir", where)
            manifest = cls(
                kind=raw["kind"],
                source=raw["source"],
                encoding=raw["encoding"],
                class_names=list(class_names),
                splits=splits,
                source_batches=[
                    _file(f, f"source_batches[{i}]", where, segments=2)
                    for i, f in enumerate(raw["source_batches"])
                ],
                seed=_count(raw["seed"], "seed", where, 0, 2**63 - 1),
                shard_size=_count(raw["shard_size"], "shard_size", where, 1, MAX_SAMPLES),
                encoder=dict(raw.get("encoder", {})),
                created=raw.get("created", ""),
                feedrate_version=raw.get("feedrate_version", ""),
                format_version=version,
                batch_dir=batch_dir,
            )
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"{where} is malformed: {type(exc).__name__} {exc}") from None
        if manifest.kind not in KINDS:
            raise ManifestError(f"{where}: kind is {manifest.kind!r}; expected one of {', '.join(KINDS)}")
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
