"""Where the dali loader is in an epoch: which samples DALI handed over, the rest of an epoch as index
files DALI reads, and DALI's own checkpoint of its reader, validated before DALI is given it.

Which sample is which. A DALI batch does not say which samples it holds, and the loader needs their
ids (loaders.resume's numbering: sample j of shard k, in manifest order, is the samples of the shards
before k plus j) to mark them consumed and to look up their crops and flips (loaders.augment.EpochDraws).
DALI knows (every output carries "tar:offset:member" as its source info), but reading it costs: a
`get_property` output ran +3.3 CPU us per image on raw, a third reader component +4.7 (medians of 10
alternating epochs of 20,000 raw samples, 2 threads, batch 256, against ~14 us in all). Instead the
label component DALI reads is widened to span its tar header and first data block (DALI's index gives
each component an offset, in 512-byte tar blocks, and a size): the label arrives as the member's
512-byte header followed by the block holding the digits, in the output the loader reads anyway. That
is 1024 bytes for every sample, so a batch is dense without the `pad` operator a ragged label needed,
which cost more than the wider copy (epochs ran 1.6 CPU us per image faster: median of 16 paired
rounds, inside the noise). The label's own size, from the index, masks the rest of its block.

The header starts with the member's name, unique in the split (shardgen names members by key), and
`SampleTable.ids` finds a batch's ids from those names: a 64-bit hash of each name, a binary search in
the split's sorted hashes, and a check that the names found are those received (a name the table
does not hold is an error, never a wrong id). The lookup costs ~0.17 us per image (a batch of 256),
marking the ids consumed 0.01. `SampleTable` is built once per loader from the index files and the
tars' header blocks (~0.2 s for CIFAR-10's 50,000 samples: a Python pass over the index lines).

The rest of an epoch. DALI reads the samples its index files list, so an index that lists only some
lines of a shard (its header count adjusted) makes DALI read only those; a shard with nothing left is
left out (DALI refuses an index of no samples). `index_files` writes these (always with the widened
label spans) into a directory the loader owns.

Ranks. DALI's reader gives rank i of n the contiguous part [floor(N i / n), floor(N (i + 1) / n)) of
its N samples (`rank_part`): parts differ by at most one sample. When fewer samples than ranks are
left, a reader of n shards would refuse; the same parts come from n = N shards, rank i reading shard
floor(N i / n) when its part is not empty.

DALI's checkpoint. With `enable_checkpointing` DALI saves its reader's position (an epoch number, the
samples handed out, the state of the shuffle buffer's generator) and its random operators' counters,
and a pipeline built with that checkpoint continues exactly (it fast-forwards its reader without
reading what was handed out: it reads only what was still in the shuffle buffer). The checkpoint is a
protobuf that DALI parses and then trusts: restoring one that claims a position of 2**60 samples would
skip for hours. So before DALI sees one, `checkpoint_position` walks it (the wire format only: the
reader's epoch and position, the iterator's counters) and the loader holds them to what its own
validated counts say.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from feedrate.errors import FeedrateError
from feedrate.shardformat import LABEL_EXT

TAR_BLOCK = 512  # a tar header: the widened label component starts this far before the label's data
LABEL_SPAN = 2 * TAR_BLOCK  # bytes of the widened label component: the header and the first data block
NAME_FIELD = 100  # a tar header's name field (NUL-padded)
MAX_CHECKPOINT = 1 << 16  # bytes of a DALI checkpoint accepted (ours are a few hundred)
# odd 64-bit multipliers, one per 8-byte word of a name (a name field holds at most 13 words)
_MIX = np.array(
    [(0x9E3779B97F4A7C15 * (2 * i + 1) + 0x632BE59BD9B4E019 * i) % (1 << 64) | 1 for i in range(13)],
    dtype=np.uint64,
)


@dataclass(frozen=True)
class Shard:
    """One shard's index, as the loader keeps it to write DALI's index files from."""

    tar: str  # local tar path
    first: int  # id of its first sample
    lines: tuple[str, ...]  # its index lines (no header), label spans already widened
    complete: np.ndarray  # bool per line: has both an image and a label member
    label_size: np.ndarray  # int64 per line: the label member's bytes (0 without one)


def rank_part(total: int, rank: int, world_size: int) -> tuple[int, int, int]:
    """(samples, shard_id, num_shards): what DALI's reader must be told so that rank `rank` of
    `world_size` reads its part of `total` samples (the module docstring); samples may be 0 (then
    there is nothing to read)."""
    samples = total * (rank + 1) // world_size - total * rank // world_size
    if total >= world_size:
        return samples, rank, world_size
    return samples, (total * rank // world_size if samples else 0), max(total, 1)


class SampleTable:
    """The split's samples: their ids, the shards' (widened) index lines, and the names DALI's label
    rows start with (see the module docstring)."""

    def __init__(self, shards: Sequence[Shard], names: np.ndarray, ids: np.ndarray, total: int) -> None:
        self.shards = tuple(shards)
        self.total = total
        self.complete = np.concatenate([s.complete for s in self.shards])  # per id
        self.label_size = np.concatenate([s.label_size for s in self.shards])  # per id
        width = max(8, -(-int(_name_lengths(names).max(initial=1)) // 8) * 8)
        self.width = width  # bytes of a label row that name its sample
        names = np.ascontiguousarray(names[:, :width])
        keys = _hash(names.view(np.uint64))
        order = np.argsort(keys, kind="stable")
        self._keys, self._names, self._ids = keys[order], names[order], ids[order]
        dup = np.flatnonzero(self._keys[1:] == self._keys[:-1])
        if dup.size:
            a, b = (int(self._ids[dup[0]]), int(self._ids[dup[0] + 1]))
            same = np.array_equal(self._names[dup[0]], self._names[dup[0] + 1])
            name = bytes(self._names[dup[0]]).rstrip(b"\0").decode("ascii", "replace")
            why = (
                f"tar member {name!r} appears twice" if same else f"the names of samples {a} and {b} collide"
            )
            raise FeedrateError(
                f"the dali loader tells samples apart by their label member's name: {why} "
                f"(in {self._shard_of(a).tar} and {self._shard_of(b).tar})"
            )

    @classmethod
    def build(
        cls, tars: Sequence[str], index_texts: Sequence[str], counts: Sequence[int], image_ext: str
    ) -> SampleTable:
        """The table of a split from its tar paths, the text of their index files, the manifest's
        sample count of each shard (an index that disagrees is an error) and the image extension."""
        shards, names, ids = [], [], []
        first = 0
        for tar, text, count in zip(tars, index_texts, counts, strict=True):
            lines, complete, header_at, label_size = _widen(text, tar, count, image_ext)
            shards.append(Shard(tar, first, tuple(lines), complete, label_size))
            if header_at.size:
                names.append(_header_names(tar, header_at[:, 1]))
                ids.append(first + header_at[:, 0])
            first += count
        table = np.concatenate(names) if names else np.zeros((0, NAME_FIELD), dtype=np.uint8)
        return cls(shards, table, np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64), first)

    def _shard_of(self, sample: int) -> Shard:
        return next(s for s in reversed(self.shards) if s.first <= sample)

    def ids(self, rows: np.ndarray) -> np.ndarray:
        """The ids (int64) of a batch from its label rows (uint8, one per sample, starting with the
        label member's tar header); a FeedrateError if a row names no sample of the split."""
        if rows.ndim != 2 or rows.shape[1] < self.width:
            raise FeedrateError(f"label rows of shape {rows.shape}; expected (batch, >= {self.width})")
        names = np.ascontiguousarray(rows[:, : self.width])
        pos = np.searchsorted(self._keys, _hash(names.view(np.uint64)))
        pos = np.minimum(pos, len(self._keys) - 1)
        if not np.array_equal(self._names[pos], names):
            bad = int(np.flatnonzero((self._names[pos] != names).any(axis=1))[0])
            name = bytes(names[bad]).rstrip(b"\0").decode("ascii", "replace")
            raise FeedrateError(
                f"DALI handed over a sample named {name!r}, which no index of the split lists"
            )
        return self._ids[pos]

    def labels(self, rows: np.ndarray, ids: np.ndarray, width: int) -> np.ndarray:
        """The first `width` bytes of each label (uint8, NUL past its end) from the label rows of the
        samples `ids`: the widened component ends at a tar block, so what follows the label's own bytes
        (the block's padding, or the next member's header when the label is empty) is masked off."""
        digits = rows[:, TAR_BLOCK : TAR_BLOCK + width].copy()
        digits[np.arange(digits.shape[1])[None, :] >= self.label_size[ids][:, None]] = 0
        return digits

    def index_files(self, dest: Path, keep: np.ndarray | None = None) -> tuple[list[str], list[str], int]:
        """(tar paths, index paths, samples): DALI's index files of the split written into `dest`, with
        only the ids where `keep` (bool per id) is set, when given; shards left without a sample are
        left out."""
        dest.mkdir(parents=True, exist_ok=True)
        tars, indexes, samples = [], [], 0
        for k, shard in enumerate(self.shards):
            lines = shard.lines
            if keep is not None:
                mask = keep[shard.first : shard.first + len(lines)]
                lines = tuple(line for line, kept in zip(lines, mask, strict=True) if kept)
            if not lines:
                continue
            path = dest / f"{k:06d}.idx"
            path.write_text(f"v1.2 {len(lines)}\n" + "\n".join(lines) + "\n", encoding="ascii")
            tars.append(shard.tar)
            indexes.append(str(path))
            samples += len(lines)
        return tars, indexes, samples


def _widen(
    text: str, tar: str, count: int, image_ext: str
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """An index's lines with each label component widened to its tar header and first data block
    (LABEL_SPAN bytes, the same for every sample: a batch of them is one dense tensor), whether each line
    has both members DALI reads (an `image_ext` and a label), (line, header offset) of every label, and
    each line's label size."""
    rows = text.splitlines()
    head = rows[0].split() if rows else []
    body = [r for r in rows[1:] if r.strip()]
    if len(head) != 2 or head[0] != "v1.2" or not head[1].isdigit() or int(head[1]) != len(body):
        raise FeedrateError(
            f"the index of {tar} does not begin with 'v1.2 <samples>' for its {len(body)} lines"
        )
    if len(body) != count:
        raise FeedrateError(f"the index of {tar} lists {len(body)} samples; the manifest says {count}")
    lines, complete, header_at = [], np.zeros(len(body), dtype=bool), []
    label_size = np.zeros(len(body), dtype=np.int64)
    for j, row in enumerate(body):
        parts = row.split()
        exts = parts[0::4]
        at = 4 * exts.index(LABEL_EXT) if LABEL_EXT in exts else -1
        try:
            offset, size = (int(parts[at + 1]), int(parts[at + 2])) if at >= 0 else (TAR_BLOCK, 0)
        except (ValueError, IndexError):
            offset = -1
        if len(parts) % 4 or offset < TAR_BLOCK or size < 0:
            raise FeedrateError(f"the index of {tar}: malformed line {j + 2}: {row[:80]}")
        if at >= 0:  # the first label member DALI reads, widened over its header
            header_at.append((j, offset - TAR_BLOCK))
            parts[at + 1], parts[at + 2] = str(offset - TAR_BLOCK), str(LABEL_SPAN)
            row = " ".join(parts)
            label_size[j] = size
        complete[j] = at >= 0 and image_ext in exts
        lines.append(row)
    return lines, complete, np.array(header_at, dtype=np.int64).reshape(-1, 2), label_size


def _header_names(tar: str, offsets: np.ndarray) -> np.ndarray:
    """The name fields (NAME_FIELD bytes each) of the tar headers at `offsets`."""
    data = np.memmap(tar, dtype=np.uint8, mode="r")
    if offsets.size and int(offsets.max()) + NAME_FIELD > data.size:
        raise FeedrateError(f"the index of {tar} points past its end")
    names = np.asarray(data[offsets[:, None] + np.arange(NAME_FIELD)])
    if not names[:, 0].all():
        j = int(np.flatnonzero(names[:, 0] == 0)[0])
        raise FeedrateError(f"{tar}: no tar header before the label at byte {int(offsets[j]) + TAR_BLOCK}")
    return names


def _name_lengths(names: np.ndarray) -> np.ndarray:
    """The length of each NUL-padded name."""
    present = names != 0
    return np.where(present.any(axis=1), names.shape[1] - np.argmax(present[:, ::-1], axis=1), 0)


def _hash(words: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row of uint64 words (multiply, xor, then a final mix)."""
    h = words[:, 0] * _MIX[0]
    for c in range(1, words.shape[1]):
        h ^= words[:, c] * _MIX[c]
    h ^= h >> np.uint64(31)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    return h ^ (h >> np.uint64(29))


# -- DALI's checkpoint ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Position:
    """What a DALI checkpoint says about where its pipeline is (see `checkpoint_position`): everything
    in it that DALI restores besides the generators' states, so that the loader can hold all of it to
    its own validated counts (`expected_iterator`)."""

    reader_epoch: int  # epochs the reader has finished
    reader_age: int  # samples the reader handed out in its epoch
    batches: int  # batches the pipeline handed out (its iteration counter)
    pipeline_epoch: int  # epochs the pipeline has finished (its epoch_idx)
    counter: int  # samples the iterator counted out
    shards_id: list[int]  # the reader shards the iterator reads
    counter_per_gpu: list[int]  # per reader shard: where its epoch started (0 in a first epoch)
    shard_sizes: list[int]  # per reader shard: its samples (PARTIAL cuts the padding by them)
    size: int  # the iterator's epoch length


def shard_sizes(readable: int, num_shards: int) -> list[int]:
    """The samples of each of DALI's `num_shards` reader shards over `readable` samples: shard i holds
    [floor(N i / n), floor(N (i + 1) / n)) (DALI's iterator computes its `_shard_sizes_per_gpu` so)."""
    return [readable * (i + 1) // num_shards - readable * i // num_shards for i in range(num_shards)]


def id_digest(ids: np.ndarray) -> int:
    """A 64-bit digest of a set of sample ids that adds up over disjoint sets: the sum, mod 2**64, of a
    mix (splitmix64's finaliser) of each id. Each rank sums the ids it hands out; a state's consumed
    bitmap (less what its pipelines left out) must then have the ranks' summed digest (a bitmap edited,
    or paired with another position, differs with odds of 2**-64 of passing). ~20 us a batch of 256
    (numpy's per-call overhead: 0.08 us an image), ~2 ms for the check of a 50,000-sample bitmap."""
    z = np.asarray(ids, dtype=np.int64).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return int(z.sum(dtype=np.uint64))


def encode_checkpoint(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_checkpoint(text: object) -> bytes:
    """A checkpoint from its base64 text; a FeedrateError when it is not one."""
    if not isinstance(text, str) or len(text) > MAX_CHECKPOINT * 4 // 3 + 4:
        raise FeedrateError(f"loader state: exact.dali must be base64 text of at most {MAX_CHECKPOINT} bytes")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise FeedrateError("loader state: exact.dali is not base64 text") from None


def checkpoint_position(data: bytes, reader: str) -> Position:
    """The reader's and the iterator's position in a DALI pipeline checkpoint (protobuf: field 1 repeated,
    one per operator: {1: name, 2: state}, the reader's state {1: {1: its generator, 2: epoch, 3: samples
    handed out}}; field 2: {1: the pipeline's JSON, 2: the iterator's JSON}). A FeedrateError when it is
    not such a checkpoint. A field that protobuf would merge or let a later copy override (any but the
    operators') must appear once: what is read here is then what DALI restores."""
    try:
        top = _fields(data)
        states = [_unique(_fields(op)) for key, op in top if key == 1]
        ours = [s.get(2, b"") for s in states if s.get(1) == reader.encode()]
        if len(ours) != 1:
            raise ValueError(f"{len(ours)} states of the reader {reader!r}")
        (snapshot,) = [v for k, v in _fields(ours[0]) if k == 1] or [b""]
        reader_state = _unique(_fields(snapshot))
        (wrapped,) = [v for k, v in top if k == 2]
        context = _unique(_fields(wrapped))
        pipeline, iterator = json.loads(context.get(1, b"")), json.loads(context.get(2, b""))
        if not isinstance(pipeline, dict) or not isinstance(iterator, dict):
            raise ValueError("not JSON objects")
        position = Position(
            reader_epoch=_count(reader_state.get(2, 0)),
            reader_age=_count(reader_state.get(3, 0)),
            batches=_count(pipeline["iter"]),
            pipeline_epoch=_count(pipeline["epoch_idx"]),
            counter=_count(iterator["_counter"]),
            shards_id=_counts(iterator["_shards_id"]),
            counter_per_gpu=_counts(iterator["_counter_per_gpu"]),
            shard_sizes=_counts(iterator["_shard_sizes_per_gpu"]),
            size=_count(iterator["_size"]),
        )
    except (ValueError, KeyError, TypeError, StopIteration, IndexError):
        raise FeedrateError(
            "loader state: exact.dali is not a checkpoint of the dali loader's pipeline"
        ) from None
    return position


def _unique(pairs: list[tuple[int, Any]]) -> dict[int, Any]:
    """A message's fields by number; ValueError when one appears twice."""
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("a field given twice")
    return out


def _counts(value: Any) -> list[int]:
    if not isinstance(value, list) or len(value) > 1 << 16:
        raise ValueError(value)
    return [_count(v) for v in value]


def _count(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 62:
        raise ValueError(value)
    return value


def _fields(data: bytes) -> list[tuple[int, Any]]:
    """A protobuf message's (field number, value) pairs: varints as int, length-delimited as bytes."""
    out: list[tuple[int, Any]] = []
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        field, kind = key >> 3, key & 7
        if kind == 0:
            value, i = _varint(data, i)
        elif kind == 2:
            size, i = _varint(data, i)
            if i + size > len(data):
                raise ValueError("truncated")
            value, i = bytes(data[i : i + size]), i + size
        else:
            raise ValueError(f"wire type {kind}")
        out.append((field, value))
    return out


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("bad varint")
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i
