"""The shard format, in one place: what shardgen writes and every loader reads.

A dataset split is a run of tar shards `{split}-{NNNNNN}.tar`, each with DALI's webdataset index
beside it (`.idx`, the `wds2idx` v1.2 text format: a `v1.2 <samples>` line, then per sample and member
`<ext> <data offset> <size> <member name>`). A sample is the consecutive members `{key}.{jpg|png|raw}`
and `{key}.cls` (the label as ASCII digits). Keys name the sample's position in its source split
(`train_012345`), so any sample can be traced back. Member and index names come from here only.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from feedrate.errors import FeedrateError

LABEL_EXT = "cls"
SHARD_SUFFIX = ".tar"
INDEX_SUFFIX = ".idx"


def shard_name(split: str, number: int) -> str:
    """The file name of shard `number` of `split`."""
    return f"{split}-{number:06d}{SHARD_SUFFIX}"


def index_name_for(shard: str) -> str:
    """The index file that belongs to a shard file name."""
    stem = shard[: -len(SHARD_SUFFIX)] if shard.endswith(SHARD_SUFFIX) else shard
    return stem + INDEX_SUFFIX


def sample_key(split: str, original_index: int) -> str:
    """Keys name the sample's position in the source split, so any sample can be traced back."""
    return f"{split}_{original_index:06d}"


class ShardError(FeedrateError):
    """A shard that is missing, truncated or does not match its manifest entry."""


class TruncatedShard(ShardError):
    """A read that got fewer bytes than the manifest promised; `data[:got]` holds what did arrive, so a
    reader that skips bad samples can still use the samples that lie wholly inside it."""

    def __init__(self, message: str, data: bytearray, got: int) -> None:
        super().__init__(message)
        self.data = data
        self.got = got


def split_member_name(name: str) -> tuple[str, str]:
    """(key, extension) of a tar member: the key ends at the first dot of the file name."""
    directory, _, base = name.rpartition("/")
    key, dot, ext = base.partition(".")
    if directory:
        key = f"{directory}/{key}"
    return key, ext if dot else ""


def write_index(tar_path: Path, idx_path: Path) -> int:
    """Write DALI's webdataset index (the `wds2idx` v1.2 format) for `tar_path`; return the sample count.

    Line 1 is `v1.2 <samples>`; then one line per sample listing, for each of its members,
    `<ext> <data offset> <size> <member name>`. Members of one sample are consecutive in the tar.
    """
    samples: list[list[str]] = []
    last_key = None
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            if not member.isreg():
                continue
            key, ext = split_member_name(member.name)
            if not key or key.endswith("/"):
                continue
            entry = f"{ext} {member.offset_data} {member.size} {member.name}"
            if key != last_key:
                samples.append([entry])
                last_key = key
            else:
                samples[-1].append(entry)
    with open(idx_path, "w", encoding="ascii") as f:
        f.write(f"v1.2 {len(samples)}\n")
        for parts in samples:
            f.write(" ".join(parts) + "\n")
    return len(samples)


@dataclass(frozen=True)
class ShardIndex:
    """Where each sample of one shard lies: data offsets and sizes of its image and label members.

    Parsed from the shard's DALI index (`wds2idx` v1.2: per sample, `<ext> <offset> <size> <name>` for
    each member). Arrays are int64, one entry per sample, in tar order. `missing` marks samples that lack
    their image or their label (only a lenient parse lets them through; their absent member has size 0
    at the offset of the other, so byte spans stay right).
    """

    name: str
    keys: tuple[str, ...]
    image_ext: str
    image_offset: np.ndarray
    image_size: np.ndarray
    label_offset: np.ndarray
    label_size: np.ndarray
    missing: np.ndarray | None = None  # bool per sample; None: none missing

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def empty(cls, name: str, image_ext: str) -> ShardIndex:
        """The index of a shard that cannot be used at all (its samples are skipped)."""
        none = np.zeros(0, dtype=np.int64)
        return cls(name, (), image_ext, none, none, none, none)

    def missing_rows(self, first: int, stop: int) -> np.ndarray:
        """Bool per sample first..stop-1: True where the sample lacks a member."""
        if self.missing is None:
            return np.zeros(stop - first, dtype=bool)
        return self.missing[first:stop]

    def span(self, first: int, stop: int) -> tuple[int, int]:
        """The byte range [start, end) of the shard that holds the data of samples first..stop-1."""
        start = min(int(self.image_offset[first]), int(self.label_offset[first]))
        end = max(
            int(self.image_offset[stop - 1] + self.image_size[stop - 1]),
            int(self.label_offset[stop - 1] + self.label_size[stop - 1]),
        )
        return start, end


def parse_index(text: str, shard: str, image_ext: str, lenient: bool = False) -> ShardIndex:
    """A ShardIndex from the text of `shard`'s .idx; every sample needs one `image_ext` and one cls.

    A sample without both is a ShardError naming the shard and its key, unless `lenient`: then it is
    marked in `missing` (for a reader that skips bad samples). A malformed index is always an error."""
    lines = text.splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != "v1.2" or not head[1].isdigit():
        raise ShardError(f"index of {shard}: expected a 'v1.2 <samples>' first line, got {lines[:1]}")
    rows = [line.split() for line in lines[1:] if line.strip()]
    if len(rows) != int(head[1]):
        raise ShardError(f"index of {shard}: header says {head[1]} samples, it lists {len(rows)}")
    keys: list[str] = []
    table = np.zeros((len(rows), 4), dtype=np.int64)  # image offset, image size, label offset, label size
    missing = np.zeros(len(rows), dtype=bool)
    for i, row in enumerate(rows):
        if len(row) % 4 or not all(row[j].isdigit() and row[j + 1].isdigit() for j in range(1, len(row), 4)):
            raise ShardError(f"index of {shard}: malformed line {i + 2}: {' '.join(row)[:80]}")
        members = {row[j]: (row[j + 1], row[j + 2], row[j + 3]) for j in range(0, len(row), 4)}
        image, label = members.get(image_ext), members.get(LABEL_EXT)
        key = split_member_name(row[3])[0]
        keys.append(key)
        if image is None or label is None:
            have = ", ".join(sorted(members))
            if not lenient:
                raise ShardError(f"{shard}: sample {key} lacks a .{image_ext} or .cls member (has: {have})")
            missing[i] = True
            present = image or label or (row[1], "0", "")
            image, label = image or (present[0], "0", ""), label or (present[0], "0", "")
        table[i] = (int(image[0]), int(image[1]), int(label[0]), int(label[1]))
    return ShardIndex(
        shard, tuple(keys), image_ext, *table.T.copy(), missing=missing if missing.any() else None
    )
