"""LOADER=wds: WebDataset shards from local disk, S3 or COS, one read per shard per epoch.

The data path, per reader (a thread of the consumer's process: handoff.py):

    units ─► shard bytes ─► shuffle buffer ─► uint8 batches ─► augment (CPU) ─► consumer: batches taken
    (partition.py) (one GET, prefetched) (samples) (decode.py) or pin (CUDA)     round-robin, [augment on
                   └───────────────── stages.py ──────────────────────────┘     the GPU after the copy]

`--workers N` (LoaderConfig.workers) means N reader threads in the consumer's process, each reading its
own share of the units (0: one reader run in the consumer's own thread, no threads). Not DataLoader
worker processes: at 32x32, pickling batches between processes, copying them through shared memory and
a copy of torch per worker cost more per image than decoding it (the lead's estimate: ~30 us/img of
pipeline overhead; measured here on 2 busy cores, this loader's whole CPU cost per image fell from 46
to 21 us on raw shards). Everything a reader spends time in releases the GIL (reads, sha256, numpy
gathers, torch ops, libjpeg-turbo and libpng), and each reader thread runs torch with one intra-op
thread, so N readers use about N cores.

- The manifest lists the shards; each shard's DALI index (read and verified once, when the loader is
  built) says where every sample's image and label lie, so a whole shard read into one buffer is sliced
  without walking tar headers or making a Python object per member.
- Each shard is one read: the local file, a verified cached copy (`cache_dir`), or one GET streamed into
  the buffer, resumed from the byte reached if the connection drops (feedrate.storage). A background
  thread fetches the next shard while the current one is decoded.
- Verified by default: a dataset on a shared bucket is someone else's input, and neither the SDK (whose
  own CRC check the zero-copy `readinto` path never reaches) nor the tar format catches a flipped byte,
  which would become a wrong image without a word. So each shard's sha256 is computed as its bytes
  arrive, local or remote, and checked against the manifest before any of its samples is used; a local
  file read again unchanged since it was hashed (its stat before and after the read) is not hashed
  again (loaders.shards.LocalVerdicts: 3.3-3.6 of 23-25 CPU us per raw image). A part
  of a shard cannot be checked against the whole shard's sha256, so under `verify` a reader that holds
  a part of a shard (a shard cut between ranks, a resumed epoch's remainder) reads the whole shard and
  slices it, counted in `stats()["part_reads"]`; shards are not cut for readers within a rank (a
  reader left without a shard idles). `verify=false` opts out: parts are then ranged GETs of just their
  bytes (the loader's `verify` attribute says which; `stats()["verified_bytes"]` counts the bytes
  checked).
- Who reads what (partition.py): the epoch's shard order (training: a permutation drawn from (seed,
  epoch), the same on every rank; validation: the manifest's), its samples concatenated in that order,
  rank r of R taking samples [r*N//R, (r+1)*N//R) -- ranks' parts differ by at most one sample, and at
  most R-1 shards are cut, at the boundaries -- and each rank's units dealt to its readers in turn.
- Shuffling (training only): the shard order, then samples drawn at random from a buffer of
  `shuffle_buffer` samples per reader (default 4,096, about 1.6 shards of 2,500; the shards themselves
  were shuffled when written), seeded by (seed, epoch, rank, reader). Validation reads in order.
- Readers decode whole batches into one uint8 array each, every image written in place into its row
  (decode.py: simplejpeg for jpg, OpenCV for png, a numpy gather for raw). Batches stay uint8 until
  the one augmentation pass per batch (augment.py): random crop with 4-pixel zero padding and
  horizontal flip (training), conversion to float32 and normalisation (always) -- the torchvision
  baseline's transforms, batched. The crop and flip of a sample are looked up by its id in the epoch's
  per-sample table (loaders.augment.EpochDraws, drawn on the CPU from (seed, epoch)), so they are the
  same whichever rank, reader or batch reads it, and in a resumed epoch. Where it runs (`augment_at`):
  with a GPU, on the GPU (the table copied there once an epoch), after the
  uint8 batch (4x fewer bytes than float32), pinned by its reader, is copied there without blocking;
  on the CPU, in the reader threads (in parallel; the consumer only hands batches on), or in the
  consumer's thread with `--workers 0`.
- Batches of exactly `batch_size`: each reader draws full batches, handed on as they are (no copy);
  only the short ones -- each reader's last, and with `skip_bad` one that lost an image -- are joined
  by the consumer, so an epoch has one partial batch, the last.
- Deterministic by (seed, epoch, world size, rank, worker count): the units and each reader's order
  follow from them, and the consumer takes the readers' batches in a fixed turn (one queue per reader,
  round-robin; a reader that has ended leaves the turn), never first-come.
- Sample ids: every batch carries its samples' ids (int64; loaders.resume's numbering: sample j of the
  manifest's shard k is the samples of shards 0..k-1 plus j), computed per batch from the unit's first
  id and the drawn positions. The consumer marks them in a loaders.resume.Progress as it hands each
  batch on; `iter_ids()` yields them.
- Exactly once: partition.py deals disjoint sample ranges to ranks and readers, and the loader checks
  that an epoch (a resumed one: its remainder) yields exactly `samples` samples. The check runs before
  the batch that completes `samples` is handed out (the readers are drained first and must have
  nothing more), since train.py
  stops after `len()` batches and closes the iterator: a check after the last batch would never run.
- Counters: each reader keeps its own store client and fetcher (bytes, requests, retries, cache hits
  and misses, verified bytes, skips); `stats()` adds up the readers' and the index reads'. A reader
  ends each epoch with a message giving the samples it skipped in it (for the exactly-once check).
- A reader's FeedrateError (a corrupt shard, an unreachable bucket) is re-raised by the consumer as it
  is. An abandoned epoch (train.py's --max-batches, a `break`) stops its readers before the next
  epoch starts; `close()` stops them and their fetch pools.
- Bad data (a corrupt or truncated shard, a sample without its image or label, a label that is not a
  class number, an image that does not decode, an index that disagrees with the manifest) is an error
  naming the shard and the sample's key. With `skip_bad` it is left out instead: counted in
  `stats()["skipped"]` (per epoch, every sample of the split is either yielded once or counted there)
  and named on stderr (the first few per reader; stages.SkipLog). An epoch may then end with
  fewer batches than `len()`. Storage that cannot be reached is never skipped: it fails after its
  retry budget (feedrate.storage).

Checkpoints (`state_dict()` / `load_state_dict()`, loaders.resume's contract). The state is the epoch,
the bitmap of samples handed out in it, the counts, and as `exact` the consumer's position in the
pass's plan: per reader the batches taken and whether its end-of-epoch message was, the readers still
in the turn, the short batches waiting to be joined ([reader, batch, samples of it handed out]), and
the plan's `base` (None, or the bitmap a resumed pass left out: ~6.7 KB for CIFAR). Otherwise a few
dozen ints, whatever the split's size. Loading one:
- same worker and rank counts (and no `skip_bad`): exact. Nothing is read or decoded to get back to the
  position: what a reader's shuffle buffer draws depends only on its units' sample counts and its rng,
  so each reader's first batches are replayed on sample numbers alone (stages.skip_draws), and its
  buffer and rng are handed on in the state the uninterrupted reader's were in. The units that buffer
  still held are read again (`resumed["refetch_units"]`), and the short batches that were waiting are
  made again by their readers and cut where they were. The continuation equals the uninterrupted run's
  batches (ids, order, pixels). The position is checked against the bitmap first: the samples it
  accounts for must be exactly this rank's consumed ones, else the state is refused.
- other counts (elastic), `skip_bad` (a shard's usable samples are known only once it is read, so a
  replay cannot know its draws), or no exact data for this rank: the remainder -- each shard's samples
  not consumed, a sorted subset -- is dealt out by the same rule as a whole epoch (shard order from
  (seed, epoch), contiguous ranges per rank differing by at most one sample, units to readers in turn)
  and shuffled by each reader's buffer as usual. Every remaining sample exactly once.
  With `skip_bad` a state records only the samples handed out, not those skipped: a bad sample skipped
  before the checkpoint is in the remainder again, so the resumed pass reads it, skips it and counts it
  in its `stats()["skipped"]` again. Over the resumed epoch, the samples yielded before the checkpoint,
  plus those yielded after it, plus the resumed loader's skips are the split exactly once (its
  exactly-once check holds); the interrupted loader's skips before the checkpoint are not part of that
  sum, and adding the two processes' skip counts counts those samples twice.
Either way a resume reads each shard that has a sample left, once, and no other: the least a state
without sample bytes allows. But a buffer drawn at random keeps stragglers of most of its shards
(measured: 20 shards of 2,500 over 2 readers, buffer 4,096, batch 256: 2, 4, 8, 10 shards held per
reader after 2, 20, 60, 96 of its ~98 batches), so late in an epoch an exact resume reads again most of
what the reader had read. `resumed` says which path was taken and why, this rank's samples and the
units read again; the resumed epoch's exactly-once check expects the remainder's count, and the epoch
after it is whole.
Costs (measured on the busy 2-core machine, 50,000 raw samples in 20 shards, 2 readers):
`state_dict()` 0.2 ms (8.6 KB of JSON, 90 bytes of it `exact`); `load_state_dict()` 15-21 ms exact
(the replays that check the position), ~1 ms elastic; load to first batch 210-290 ms exact, 185-210
ms elastic, against 90-135 ms for a fresh epoch's first batch (the held shards are read first). (The
exact figures were measured with each reader replayed twice by load_state_dict and once more by the
first pass; now it is replayed once, in load_state_dict, and every pass resumes from copies.) On the
hot path: each batch's ids (~5 us), marking them and the consumer's bookkeeping (~3.5 us), while
looking the crop and flip up by id costs ~5 us a batch less than drawing them: ~0.015 us/img net.

Options (`LoaderConfig.options`; strings such as "true" or "8" are accepted from a command line):
`verify` (bool, default true), `rehash` (bool, default false: a local shard is hashed when first read,
then trusted while unchanged; true hashes it on every read, see loaders.shards.LocalVerdicts),
`shuffle_buffer` (samples, >= 0), `decode` (by encoding: raw auto |
gather | numpy (its former name); jpg auto | simplejpeg | opencv | torchvision | pil; png auto |
opencv | torchvision | pil),
`prefetch` (shards fetched at once, ahead, per reader: auto | an integer >= 0; see below), `net` (a
feedrate.network preset name: the link to plan prefetching for), `augment_at` (auto | reader | device),
`keys` (bool: also carry sample keys, for `iter_keyed()`, the tests' exactly-once check), `skip_bad`
(bool: skip and count bad samples instead of failing; train.py's `--skip-bad`), `read_ahead` (bool,
default true: see below).
Prefetch depth (`prefetch=auto`, the default): 1 for a local dataset. For a remote one, the
bandwidth-delay product (feedrate.network.prefetch_depth): the shard fetches each reader keeps in flight
so that a consumer of DEFAULT_DEMAND_IMG_S images/s is fed over the link -- the `net` preset, else
FEEDRATE_NET's, else the link measured: the index reads made when the loader is built give the time to
first byte, and each reader re-plans its depth from its own timed shard GETs (large enough to show the
bytes/s one connection carries). The first choice and its inputs are in `prefetch_plan`; the readers'
current depths, summed, in `stats()["prefetch_depth"]`. Training readers also read ahead across the
epoch boundary, local or remote: once the last shard of an epoch is on its way, the first shards of the
next one are read too -- as many as the depth, and at least those its shuffle buffer needs before its
first draw (two shards of 2,500 at the default buffer) -- so an epoch does not open with every reader
reading and hashing its first shards (measured on the bench's raw shards, 2 readers, 5 epochs of
20,000, 3 runs each way alternated on a quiet machine: the first batch of an epoch came 71-81 ms after
`iter()` without, 19-23 ms with; epochs read 69-71k against 77-80k img/s). A shard read ahead is
verified then: a change made to it afterwards is seen in the epoch after next, not the next one. Not
with `skip_bad`, whose skips are counted in the epoch that loads them, nor with `cache_dir`: a reader
reading ahead a shard that another reader is still fetching into the cache would miss the cache and
fetch it again (measured: 4 GETs in a first epoch of 2 shards, not 2).
Stage times (`stage_times()`, the loaders.stagetimes contract; cumulative, summed over the readers):
- `storage`: a reader's wait for a shard's bytes (wall), and the fetch threads' CPU seconds reading,
  hashing and checking them, retries and backoff included (the fetch runs in the reader's pool, ahead:
  its wall time is what the reader did not have to wait, so only the wait counts as wall);
- `decode`: bytes to each uint8 batch and its labels (decode.py), per batch;
- `augment`: the shuffle buffer's draws (batching), crop, flip and normalise -- in the readers, or with
  `augment_at=device` (or `--workers 0`) in the consumer -- and the joining of short batches;
- `transfer`: host-to-device copies in the consumer, and pinning by a reader (CUDA);
- `queue`: the consumer taking a batch already waiting in a reader's queue (handoff.py), not its wait
  for one still being made.
One timed span per batch or shard (~4 us each, ~0.1 us an image; tests/stage_cost.py measures it). On
CUDA the consumer's figures are the CPU's side of work queued on the stream (a non-blocking copy, the
augmentation's kernels): the GPU's own time is the step's.

Memory per reader: the shard being decoded, `prefetch` shards ahead, the shards the buffer still draws
from (2 at an epoch's start at the default sizes, growing towards all of the reader's shards by its
end: see the stragglers above), and up to QUEUE_DEPTH batches waiting for the consumer; no second copy
of torch, since readers are threads.
"""

from __future__ import annotations

import functools
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from feedrate import network
from feedrate.errors import FeedrateError
from feedrate.manifest import Manifest
from feedrate.shardformat import ShardError, ShardIndex
from feedrate.storage import open_store
from loaders.augment import EpochDraws, normalize
from loaders.base import Download, LoaderConfig, batches_for, last_epoch
from loaders.decode import DECODERS, Decoder, decode_choices
from loaders.handoff import END, InlineReader, ReaderThreads, in_turn
from loaders.options import choice, count, flag, net_preset, parse_options
from loaders.partition import Unit, rank_units, reader_units, remainder_rows, shard_order
from loaders.resume import Progress, check, decode, encode, exact_for, same_counts
from loaders.seeds import ORDER, epoch_seed
from loaders.shards import DatasetRoot, LocalVerdicts, ShardFetcher, ShardRef, dataset_key, open_dataset
from loaders.stages import (
    LoadedUnit,
    ResumePoint,
    SkipLog,
    decoded,
    drawn,
    load_unit,
    prefetched,
    skip_draws,
    transformed,
)
from loaders.stagetimes import STAGES, Snapshot, StageTimes
from loaders.stats import LoaderStats
from loaders.transfer import pins, to_device

DEFAULT_SHUFFLE_BUFFER = 4096
DEFAULT_PREFETCH = 1
AUGMENT_AT = ("auto", "reader", "device")
INDEX_READERS = 8  # threads reading index files when the loader is built (remote: latency-bound)
QUEUE_DEPTH = 3  # batches each reader thread may have waiting for the consumer
NAME = "wds"  # the loader's name in its states (loaders.LOADERS)


@dataclass(frozen=True)
class WdsOptions:
    """The backend's knobs, validated: unknown names and bad values are FeedrateErrors."""

    verify: bool = True  # sha256 of every shard checked before use (see the module docstring)
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER
    decode: str = "auto"
    prefetch: int | None = None  # None: auto (see the module docstring)
    net: str = ""
    keys: bool = False
    augment_at: str = "auto"
    skip_bad: bool = False
    read_ahead: bool = True  # training data: start the next epoch's first shards early
    rehash: bool = False  # hash a local shard on every read, not once while unchanged (LocalVerdicts)

    @classmethod
    def parse(cls, options: dict[str, Any], encoding: str) -> WdsOptions:
        """Options from `LoaderConfig.options` for shards of `encoding` (which decoders apply)."""
        declared = {
            "verify": flag,
            "shuffle_buffer": count(0),
            "decode": choice(*decode_choices(encoding), where=f"for {encoding} shards"),
            "prefetch": count(0, auto=True),
            "net": net_preset,
            "keys": flag,
            "augment_at": choice(*AUGMENT_AT),
            "skip_bad": flag,
            "read_ahead": flag,
            "rehash": flag,
        }
        return cls(**parse_options("wds", options, declared))


@dataclass(frozen=True)
class StreamSpec:
    """Everything a reader needs, fixed when the loader is built."""

    url: str
    endpoint_url: str | None
    manifest: Manifest
    refs: tuple[ShardRef, ...]
    indexes: tuple[ShardIndex, ...]
    unusable: tuple[str, ...]  # per shard: why it cannot be used at all ("" when it can; skip_bad only)
    shard_samples: tuple[int, ...]  # per shard, in manifest order
    shard_id0: tuple[int, ...]  # per shard: the sample number (loaders.resume) of its first sample
    rank: int
    world_size: int
    readers: int  # reader threads (1 with --workers 0: the consumer's own thread)
    batch_size: int
    train: bool
    seed: int
    cache_dir: str | None
    options: WdsOptions
    prefetch: int  # shard fetches in flight per reader (options.prefetch resolved)
    adaptive: bool  # the link was measured: each reader re-plans its depth from its own GETs
    shard_bytes: int  # the typical shard, and this reader's share of the demand (bytes/s): what the
    reader_demand_bps: float  # depth is re-planned with
    augment_in_reader: bool  # readers send float32 batches ready to use, else uint8 NHWC
    pin: bool  # uint8 batches bound for CUDA are pinned by the reader (the copy then runs async)
    verdicts: LocalVerdicts | None  # local shards hashed and unchanged since, shared by the readers

    @property
    def total(self) -> int:
        return sum(self.shard_samples)


@dataclass(frozen=True)
class EpochPlan:
    """Who reads what in one pass over an epoch (partition.py): this rank's units and each reader's."""

    epoch: int
    base: np.ndarray | None  # the consumed set the pass leaves out (a resumed epoch), None: the whole epoch
    units: list[Unit]
    readers: list[list[Unit]]

    @property
    def samples(self) -> int:
        return sum(u.samples for u in self.units)


def plan_epoch(spec: StreamSpec, epoch: int, base: np.ndarray | None = None) -> EpochPlan:
    """This rank's part of `epoch` (all of it, or what `base` leaves), and its readers' units."""
    order = shard_order(len(spec.refs), epoch, spec.seed, shuffle=spec.train)
    rows = remainder_rows(spec.shard_samples, base) if base is not None else None
    units = rank_units(spec.shard_samples, order, spec.rank, spec.world_size, rows)
    readers = reader_units(units, spec.readers, spec.shard_samples, split=not spec.options.verify)
    return EpochPlan(epoch, base, units, readers)


def reader_rng(spec: StreamSpec, epoch: int, worker: int) -> np.random.Generator | None:
    """The generator of reader `worker`'s shuffle buffer in `epoch` (None: validation, in order)."""
    if not spec.train:
        return None
    return np.random.default_rng(epoch_seed(spec.seed, epoch, spec.rank, worker, ORDER))


def replay(
    spec: StreamSpec, plan: EpochPlan, worker: int, draws: int, before: int | None = None
) -> ResumePoint:
    """Reader `worker`'s stream after its first `draws` batches, on numbers alone (stages.skip_draws;
    `before`: also the point after that many, as `earlier`)."""
    units = plan.readers[worker]
    return skip_draws(
        [u.positions() for u in units],
        [spec.shard_id0[u.shard] + u.first for u in units],
        spec.batch_size,
        spec.options.shuffle_buffer if spec.train else 0,
        reader_rng(spec, plan.epoch, worker),
        draws,
        before,
    )


# -- the reader: one per reader thread (or the consumer's thread) ---------------------------------
class _ReaderState:
    """Per-reader resources, kept across epochs: a store client of its own (its counters are this
    reader's), a fetch thread pool, a skip log, and the loads read ahead into the next epoch."""

    def __init__(self, spec: StreamSpec, stages: StageTimes) -> None:
        self.stages = stages  # the loader's: every reader adds to it
        store = open_store(spec.url, endpoint_url=spec.endpoint_url)
        self.fetcher = ShardFetcher(
            DatasetRoot(store, spec.manifest), spec.cache_dir, spec.options.verify, spec.verdicts
        )
        # A measured link is re-measured on the shard GETs themselves and the depth follows (`depth`),
        # up to network.MAX_DEPTH fetches at once; otherwise the depth is fixed.
        self.adaptive = spec.adaptive
        self.depth = max(1, spec.prefetch)
        self._spec = spec
        self.pool = ThreadPoolExecutor(
            max_workers=network.MAX_DEPTH if self.adaptive else self.depth, thread_name_prefix="wds-fetch"
        )
        self.skips = SkipLog("wds") if spec.options.skip_bad else None
        # Reading ahead into the next epoch (module docstring), from local disk too: a verified shard
        # of 11.5 MB costs ~10 ms of sha256. Not when skipping bad samples (a skip is counted in the
        # epoch that loads its shard), nor with a cache directory (a shard another reader is still
        # caching would be fetched twice).
        self.read_ahead = (
            spec.options.read_ahead and spec.train and not spec.options.skip_bad and spec.cache_dir is None
        )
        self._ahead: tuple[int, list[Unit], list[Future]] | None = None

    def take_ahead(self, epoch: int, units: list[Unit]) -> list[Future]:
        """The loads read ahead for `epoch` when they are of its first units (else none: dropped)."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return []
        if ahead[0] == epoch and ahead[1][: len(ahead[2])] == units[: len(ahead[2])]:
            return ahead[2]
        for future in ahead[2]:
            future.cancel()
        return []

    def spill_to(self, epoch: int, units: list[Unit]) -> tuple[list[Unit], list[Future]]:
        """Where this epoch's pass starts loading `epoch`'s (the next one's) first units while it drains
        (stages.prefetched's `spill`): without it, every epoch would open with the reader waiting one
        shard's fetch time for its first shard."""
        started: list[Future] = []
        self._ahead = (epoch, units, started)
        return units, started

    def current_depth(self) -> int:
        """The prefetch depth now: re-planned from this reader's own timed shard GETs on a measured link
        (their bodies are large enough to show the per-connection bandwidth; the index reads made when
        the loader was built are not)."""
        if self.adaptive:
            store = self.fetcher.root.store
            link = network.measured(list(store.timings), peak_conn_bps=store.peak_body_bps)
            if link is not None and math.isfinite(link.conn_bps):
                # the link measured here is this reader's share of it: planned for its share of the demand
                spec = self._spec
                self.depth = network.prefetch_depth(link, spec.shard_bytes, spec.reader_demand_bps)
        return self.depth

    def stats(self) -> LoaderStats:
        """This reader's counters."""
        return self.fetcher.stats(self.skips.count if self.skips else 0, self.depth)

    def close(self) -> None:
        """Cancel the loads not begun (one under way ends on its own; its result is dropped)."""
        self._ahead = None
        self.pool.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True)
class EpochDone:
    """A reader's last message of an epoch: the samples it skipped in it (skip_bad)."""

    skipped: int


def reader_messages(
    spec: StreamSpec,
    decoder: Decoder,
    worker: int,
    epoch: int,
    units: list[Unit],
    state: _ReaderState,
    draws: EpochDraws | None = None,
    resume: ResumePoint | None = None,
    following: list[Unit] | None = None,
) -> Iterator[tuple | EpochDone]:
    """Reader `worker`'s pass over its `units` of `epoch`: (images, labels, keys | None, ids) per
    batch, then EpochDone.

    The pipeline: units -> loaded shards -> drawn batches -> decoded uint8 -> augmented float32 by the
    epoch's per-sample `draws` (when the readers augment) or pinned uint8 (bound for CUDA). Every batch
    holds `batch_size` samples but the reader's last one (and, with skip_bad, one that lost an
    undecodable image). `resume`: start after the batches a replay skipped (stages.skip_draws), reading
    again the units its buffer still holds. `following`: this reader's units of the next epoch, for
    reading ahead across the boundary."""
    skipped_before = state.stats().skipped
    classes = len(spec.manifest.class_names)
    stages = state.stages

    def load(unit: Unit) -> LoadedUnit:
        # in a fetch thread: its CPU seconds are storage's; its wall time is the reader's only where the
        # reader waits for it (counted by `prefetched`)
        ref, index, unusable = spec.refs[unit.shard], spec.indexes[unit.shard], spec.unusable[unit.shard]
        cpu = time.thread_time()
        try:
            return load_unit(
                unit, ref, index, state.fetcher, classes, state.skips, unusable, spec.shard_id0[unit.shard]
            )
        finally:
            stages.add("storage", 0.0, time.thread_time() - cpu)

    todo = units if resume is None else [units[i] for _, i in resume.held] + units[resume.next_unit :]
    ready: list[Future] = []
    spill = None
    if state.read_ahead:
        ready = state.take_ahead(epoch, todo)
        if following is not None:
            spill = state.spill_to(epoch + 1, following)
    buffer = spec.options.shuffle_buffer if spec.train else 0
    lead = 0
    if spill is not None:  # the next pass's units its buffer needs filled before its first draw
        need = np.cumsum([u.samples for u in spill[0]]) < buffer + spec.batch_size
        lead = min(len(spill[0]), int(need.sum()) + 1)
    loaded = prefetched(todo, load, state.pool, state.current_depth, ready, spill, stages, lead)
    rng = reader_rng(spec, epoch, worker)
    batches = decoded(
        drawn(loaded, spec.batch_size, buffer, rng, stages, resume),
        decoder,
        spec.options.keys,
        state.skips,
        stages,
    )
    if spec.augment_in_reader:
        batches = transformed(batches, decoder.layout, draws, stages)
    elif spec.pin:
        batches = _pinned(batches, stages)
    yield from batches
    yield EpochDone(state.stats().skipped - skipped_before)


def _pinned(batches: Iterator[tuple], stages: StageTimes) -> Iterator[tuple]:
    """uint8 batches bound for CUDA, pinned by the reader (counted as `transfer`)."""
    for images, labels, keys, ids in batches:
        with stages.timed("transfer"):
            images = images.pin_memory()
        yield images, labels, keys, ids


# -- where the consumer is in a pass ------------------------------------------------------------
@dataclass
class _Piece:
    """A reader's short batch waiting to be joined (its samples from `offset` on are not handed out)."""

    images: torch.Tensor
    labels: torch.Tensor
    keys: list[str] | None
    ids: torch.Tensor
    reader: int
    batch: int  # its number in the reader's stream
    offset: int  # samples of it already handed out, in an earlier joined batch


@dataclass
class Cursor:
    """What the consumer has taken in a pass: per reader its batches and whether its EpochDone, the
    readers still in the turn (in turn order; the others have ended), and the short batches waiting
    to be joined. With the pass's plan this fixes everything that follows (the `exact` state)."""

    batches: list[int]
    done: list[bool]
    turn: deque[int]
    pending: list[_Piece] = field(default_factory=list)
    refill: list[tuple[int, int, int]] = field(default_factory=list)  # (reader, batch, offset) to read again

    @classmethod
    def start(cls, readers: int) -> Cursor:
        return cls([0] * readers, [False] * readers, deque(range(readers)))

    def copy(self) -> Cursor:
        refill = self.refill + [(p.reader, p.batch, p.offset) for p in self.pending]
        return Cursor(list(self.batches), list(self.done), deque(self.turn), [], refill)

    def as_json(self) -> dict[str, Any]:
        pieces = self.refill + [(p.reader, p.batch, p.offset) for p in self.pending]
        return {
            "batches": list(self.batches),
            "done": list(self.done),
            "turn": list(self.turn),
            "pending": [list(p) for p in pieces],
        }

    def draws(self) -> list[int]:
        """Per reader, the batches it must skip when the pass resumes here: those taken, less the one
        still waiting to be joined (it is read again)."""
        skip = list(self.batches)
        for reader, batch, _ in self.refill:
            skip[reader] = batch
        return skip


@dataclass
class _Resume:
    """A loaded state, served when the loader's epoch is its epoch (until that pass has ended)."""

    epoch: int
    consumed: np.ndarray  # carried into the pass's Progress
    base: np.ndarray | None  # what the pass's plan leaves out: the consumed set (elastic) or exact's base
    cursor: Cursor | None  # exact: where the consumer was; None: elastic, from the plan's start
    samples: int  # this rank's remaining samples
    plan: EpochPlan  # the pass's plan (for `base`)
    points: list[ResumePoint] | None = None  # exact: where each reader resumes (a copy per pass)


def _bad(key: str, value: Any, accepted: str) -> FeedrateError:
    text = repr(value)
    return FeedrateError(
        f"loader state: exact {key} {text[:80]}{'...' if len(text) > 80 else ''}; accepted: {accepted}"
    )


def _ints(key: str, value: Any, n: int, low: int, high: list[int] | int) -> list[int]:
    highs = high if isinstance(high, list) else [high] * n
    ok = (
        isinstance(value, list)
        and len(value) == n
        and all(
            isinstance(v, int) and not isinstance(v, bool) and low <= v <= h
            for v, h in zip(value, highs, strict=True)
        )
    )
    if not ok:
        raise _bad(key, value, f"a list of {n} integers, each {low}..{'/'.join(map(str, highs))}")
    return value


@dataclass(frozen=True)
class ExactPoint:
    """A state's exact position, checked (`parse_exact`): the consumer's cursor, the plan's base and
    plan, this rank's remaining samples, and where each reader resumes (its replay, made once)."""

    cursor: Cursor
    base: np.ndarray | None
    plan: EpochPlan
    left: int
    points: list[ResumePoint]


def parse_exact(
    exact: Any, plan_for: Callable[[np.ndarray | None], EpochPlan], spec: StreamSpec, consumed: np.ndarray
) -> ExactPoint:
    """A state's `exact` data for this rank, checked against its plan and its consumed set.
    `plan_for(base)` gives the epoch's plan. One replay per reader both checks the position and gives
    the point it resumes from. One-line FeedrateErrors name the bad value (a state is a file someone
    may hand you)."""
    if not isinstance(exact, Mapping) or set(exact) != {"base", "batches", "done", "turn", "pending"}:
        raise _bad("data", exact, "a mapping with keys base, batches, done, turn, pending")
    base = None
    if exact["base"] is not None:
        base = decode(exact["base"], spec.total)
        if (base & ~consumed).any():
            raise FeedrateError("loader state: exact base holds samples its consumed set does not")
    plan: EpochPlan = plan_for(base)
    readers = len(plan.readers)
    size = spec.batch_size
    counts = [batches_for(sum(u.samples for u in units), size) for units in plan.readers]
    batches = _ints("batches", exact["batches"], readers, 0, counts)
    done = exact["done"]
    if not (
        isinstance(done, list)
        and len(done) == readers
        and all(
            isinstance(d, bool) and (not d or b == c) for d, b, c in zip(done, batches, counts, strict=True)
        )
    ):
        raise _bad("done", done, f"{readers} booleans, true only for a reader whose batches were all taken")
    turn = exact["turn"]
    if not (
        isinstance(turn, list)
        and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < readers for t in turn)
        and len(set(turn)) == len(turn)
        and all(done[r] for r in range(readers) if r not in turn)
    ):
        raise _bad("turn", turn, f"distinct readers 0..{readers - 1}, every one left out done")
    pending = exact["pending"]
    refill: list[tuple[int, int, int]] = []
    for piece in pending if isinstance(pending, list) else [None]:
        ok = isinstance(piece, list) and len(piece) == 3 and all(type(v) is int for v in piece)
        if ok:
            reader, batch, offset = piece
            ok = 0 <= reader < readers and batch == batches[reader] - 1 >= 0
            ok = ok and reader not in [r for r, _, _ in refill]
            ok = ok and offset >= 0
        if not ok:
            raise _bad("pending", pending, "[reader, batch, offset] of a reader's last, short batch taken")
        refill.append((reader, batch, offset))
    # one replay per reader: to its batches taken (the ids handed out), and for a reader whose last short
    # batch waits to be joined also to the batch before it (where it resumes: that batch is read again)
    again = {r: b for r, b, _ in refill}
    points = [replay(spec, plan, w, batches[w], again.get(w)) for w in range(readers)]
    for reader, batch, offset in refill:
        if not offset < len(points[reader].ids[batch]) < size:
            raise _bad("pending", pending, "[reader, batch, offset] of a reader's last, short batch taken")
    if sum(len(points[r].ids[b]) - off for r, b, off in refill) >= size:
        raise _bad("pending", pending, f"fewer than {size} samples waiting (a full batch would have gone)")
    # The samples this position says were handed out must be exactly this rank's consumed ones.
    handed = [points[w].ids[b] for w in range(readers) for b in range(batches[w])]
    for reader, batch, offset in refill:
        handed[sum(batches[:reader]) + batch] = points[reader].ids[batch][:offset]
    handed_ids = np.sort(np.concatenate(handed)) if handed else np.zeros(0, dtype=np.int64)
    part = np.concatenate([spec.shard_id0[u.shard] + u.first + u.positions() for u in plan.units] or [[]])
    part = part.astype(np.int64)
    mine = np.sort(part[consumed[part]])
    if not np.array_equal(handed_ids, mine):
        raise FeedrateError(
            f"loader state: exact position (batches {batches}) accounts for {len(handed_ids)} samples of "
            f"rank {spec.rank}'s part; its consumed set holds {len(mine)} of them, not the same"
        )
    cursor = Cursor(list(batches), list(done), deque(turn), [], refill)
    starts = [p if w not in again else p.earlier for w, p in enumerate(points)]
    assert all(p is not None for p in starts)
    return ExactPoint(cursor, base, plan, len(part) - len(mine), starts)  # type: ignore[arg-type]


# -- the loader ------------------------------------------------------------------------------------
def plan_prefetch(
    root: DatasetRoot, options: WdsOptions, shard_bytes: int, demand: float, readers: int
) -> dict[str, Any]:
    """The prefetch depth per reader and why: the option when it is a number, else 1 for local data,
    else the bandwidth-delay product of the link for `demand` bytes/s (see the module docstring)."""
    if options.prefetch is not None:
        return {"depth": options.prefetch, "source": "option"}
    found = network.link_for(root.store, options.net or None)
    if found is None:
        return {"depth": DEFAULT_PREFETCH, "source": "local"}
    link, source = found
    depth = network.prefetch_depth(link, shard_bytes, demand, readers)
    return {
        "depth": depth,
        "source": source,
        "link": link.as_dict(),
        "shard_bytes": shard_bytes,
        "readers": readers,
        "demand_MBps": round(demand / network.MB, 3),
    }


def _rank_of(cfg: LoaderConfig) -> tuple[int, int]:
    """(rank, world size): the config's, else torch.distributed's when it is initialised."""
    if cfg.world_size > 1:
        return cfg.rank, cfg.world_size
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _read_indexes(
    fetcher: ShardFetcher, refs: list[ShardRef], skip_bad: bool
) -> list[tuple[ShardIndex, str]]:
    """Each shard's index and, with `skip_bad`, why the shard cannot be used ("" when it can)."""

    def read(ref: ShardRef) -> tuple[ShardIndex, str]:
        try:
            index = fetcher.read_index(ref, lenient=skip_bad)
            if len(index) != ref.samples:
                raise ShardError(
                    f"{fetcher.root.store.url_for(ref.index_name)} lists {len(index)} samples; the manifest "
                    f"says {ref.name} holds {ref.samples} (the manifest does not match the shards)"
                )
            return index, ""
        except ShardError as exc:
            if not skip_bad:
                raise
            return ShardIndex.empty(ref.name, fetcher.root.manifest.encoding), str(exc)

    if fetcher.local or len(refs) == 1:
        return [read(ref) for ref in refs]
    with ThreadPoolExecutor(max_workers=INDEX_READERS, thread_name_prefix="wds-index") as pool:
        return list(pool.map(read, refs))


class WdsLoader:
    """The WebDataset streaming loader (see the module docstring); honours loaders.base.Loader."""

    def __init__(self, cfg: LoaderConfig) -> None:
        self.cfg = cfg
        root = open_dataset(cfg.data, cfg.endpoint_url)
        self.options = WdsOptions.parse(dict(cfg.options), root.manifest.encoding)
        self.verify = self.options.verify
        refs = root.shards(cfg.split)
        rank, world_size = _rank_of(cfg)
        self.device = torch.device(cfg.device)
        at = self.options.augment_at
        if at == "auto":
            # On a GPU the augmentation costs the CPU nothing. On the CPU the readers augment: the main
            # process then only hands batches on, whatever its torch thread count (when it augmented
            # with 2 intra-op threads next to 2 busy workers on 2 cores, throughput fell by a third).
            at = "reader" if self.device.type == "cpu" and cfg.workers > 0 else "device"
        self._fetcher = ShardFetcher(root, cfg.cache_dir, self.options.verify)  # index reads, counted
        indexes, unusable = zip(*_read_indexes(self._fetcher, refs, self.options.skip_bad), strict=True)
        readers = max(1, cfg.workers)
        shard_bytes = int(np.median([r.bytes for r in refs]))
        # the demand a GPU-fed consumer makes, in bytes/s of this dataset's shards
        demand = network.DEFAULT_DEMAND_IMG_S * sum(r.bytes for r in refs) / sum(r.samples for r in refs)
        self.prefetch_plan = plan_prefetch(root, self.options, shard_bytes, demand, readers)
        counts = tuple(r.samples for r in refs)
        spec = StreamSpec(
            url=root.url if root.store.is_local else cfg.data,
            endpoint_url=cfg.endpoint_url,
            manifest=root.manifest,
            refs=tuple(refs),
            indexes=tuple(indexes),
            unusable=tuple(unusable),
            shard_samples=counts,
            shard_id0=tuple(int(x) for x in np.cumsum((0, *counts[:-1]))),
            rank=rank,
            world_size=world_size,
            readers=readers,
            batch_size=cfg.batch_size,
            train=cfg.train,
            seed=cfg.seed,
            cache_dir=cfg.cache_dir,
            options=self.options,
            prefetch=self.prefetch_plan["depth"],
            adaptive=self.prefetch_plan["source"] == "measured",
            shard_bytes=shard_bytes,
            reader_demand_bps=demand / readers,
            augment_in_reader=at == "reader",
            pin=pins(self.device),
            verdicts=None if self.options.rehash else LocalVerdicts(),
        )
        self._spec = spec
        self._decoder = DECODERS[(root.manifest.encoding, self.options.decode)]
        self._decoder.prepare()
        total = spec.total
        self._part = (rank + 1) * total // world_size - rank * total // world_size  # a whole epoch's
        self.downloads: list[Download] = []
        self.decode_device = "cpu"
        self._augment_in_reader = at == "reader"
        self._layout = self._decoder.layout
        self._epoch = 0
        self._rank = rank
        self._world_size = world_size
        self._states: list[_ReaderState] = []  # one per reader, made on first use, kept across epochs
        self._threads: ReaderThreads | None = None  # the reader threads of the pass under way
        self._epoch_skipped = 0  # samples the readers skipped in the epoch being read
        self._stages = StageTimes()  # every reader's and the consumer's stage seconds (module docstring)
        # where the loader is in its epoch (loaders.resume): the samples handed out, and the consumer's
        # position in the pass's plan (Cursor); `_begun`: whether they describe the epoch now set
        self._progress = Progress(total, dataset_key(root))
        self._cursor = Cursor.start(readers)
        self._base: np.ndarray | None = None  # the plan's base of the pass described
        self._begun = False
        self._resume: _Resume | None = None
        self._draws: tuple[int, EpochDraws, EpochDraws] | None = None  # (epoch, on the CPU, on device)
        self._plans: dict[int, EpochPlan] = {}  # a whole epoch's plan, by epoch
        # how the last load_state_dict is served (None: no state loaded); see load_state_dict
        self.resumed: dict[str, Any] | None = None

    @property
    def samples(self) -> int:
        """This rank's samples in the epoch now set: its part, or what a loaded state left of it."""
        resume = self._active_resume()
        return self._part if resume is None else resume.samples

    def __len__(self) -> int:
        return batches_for(self.samples, self.cfg.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        self._begun = False

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, _, _ in self._batches():
            yield images, labels

    def iter_keyed(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        """Like iteration, plus each batch's sample keys (needs the `keys` option)."""
        if not self.options.keys:
            raise FeedrateError("iter_keyed() needs the wds option keys=True")
        for images, labels, keys, _ in self._batches():
            yield images, labels, keys

    def iter_ids(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Like iteration, plus each batch's sample ids (int64 on the CPU; loaders.resume's numbering)."""
        for images, labels, _, ids in self._batches():
            yield images, labels, ids

    def close(self) -> None:
        """Stop the reader threads and their fetch pools now (safe to call twice; iterating again
        starts afresh)."""
        self._stop_readers()
        for state in self._states:
            state.close()
        self._states = []

    def __enter__(self) -> WdsLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stage_times(self) -> Snapshot:
        """Cumulative wall and CPU seconds per stage since the loader was built (loaders.stagetimes);
        every stage is separable here, so all five are reported (zero until first used)."""
        snapshot = self._stages.snapshot()
        for kind in snapshot.values():
            for stage in STAGES:
                kind.setdefault(stage, 0.0)
        return snapshot

    def stats(self) -> dict[str, int]:
        """The index reads made here and every reader's counters, summed; `part_reads`: shards read
        whole (verified) for a part of them (partition.py)."""
        total = self._fetcher.stats(prefetch_depth=0)
        parts = 0
        for state in self._states:
            total += state.stats()
            parts += state.fetcher.part_reads
        return total.as_dict() | {"part_reads": parts}

    # -- the loader's state (loaders.resume) --------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Where this loader is in its epoch (loaders.resume's contract): the samples it handed out,
        and as `exact` the consumer's position in the pass's plan (Cursor) and the plan's base (what a
        resumed epoch left out); `exact` is None with skip_bad, whose usable counts a later run cannot
        know before reading (see the module docstring)."""
        self._begin()
        exact = None
        if not self.options.skip_bad:
            base = None if self._base is None else encode(self._base)
            exact = {"base": base, **self._cursor.as_json()}
        cfg = self.cfg
        return self._progress.state(NAME, cfg.split, cfg.seed, cfg.workers, self._world_size, exact)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Serve, when the epoch set is `state["epoch"]`, only what the state left of it (module
        docstring): exactly the uninterrupted run's batches when the worker and rank counts are the
        state's (and its exact data checks out), else the remainder dealt out again (elastic).
        `resumed` then says which, why, this rank's samples, and the shards read again."""
        cfg, spec = self.cfg, self._spec
        consumed = check(state, NAME, cfg.split, cfg.seed, spec.total, self._progress.dataset)
        epoch = state["epoch"]
        exact = exact_for(state, self._rank)
        why = ""
        if not same_counts(state, cfg.workers, self._world_size):
            why = (
                f"counts differ: the state's {state['workers']} workers x {state['world_size']} ranks, "
                f"now {cfg.workers} x {self._world_size}"
            )
        elif self.options.skip_bad:
            why = "skip_bad: the usable samples of a shard are known only once it is read"
        elif exact is None:
            why = f"the state has no exact data for rank {self._rank}"
        self._stop_readers()
        refetch = 0
        if why:
            plan = self._plan(epoch, consumed)
            resume = _Resume(epoch, consumed, consumed, None, plan.samples, plan)
        else:
            at = parse_exact(exact, lambda b: self._plan(epoch, b), spec, consumed)
            resume = _Resume(epoch, consumed, at.base, at.cursor, at.left, at.plan, at.points)
            refetch = sum(len(p.held) for p in at.points)
        self._resume = resume
        self._begun = False
        self.resumed = {
            "mode": "elastic" if why else "exact",
            "why": why or "same worker and rank counts",
            "epoch": epoch,
            "samples": resume.samples,
            "refetch_units": refetch,
        }

    def _active_resume(self) -> _Resume | None:
        resume = self._resume
        return resume if resume is not None and resume.epoch == self._epoch else None

    def _plan(self, epoch: int, base: np.ndarray | None) -> EpochPlan:
        """The plan of `epoch` without `base`: a whole epoch's is kept for the last few epochs asked; one
        with a base is made for a loaded state, which keeps it (`_Resume.plan`)."""
        if base is not None:
            return plan_epoch(self._spec, epoch, base)
        plan = self._plans.get(epoch)
        if plan is None:
            if len(self._plans) > 4:
                self._plans.clear()
            plan = self._plans[epoch] = plan_epoch(self._spec, epoch, None)
        return plan

    def _begin(self) -> None:
        """Progress and position at the start of the epoch now set (a loaded state's, or nothing yet),
        unless they already describe it."""
        if self._begun and self._progress.epoch == self._epoch:
            return
        resume = self._active_resume()
        self._progress.start(self._epoch, None if resume is None else resume.consumed)
        if resume is not None and resume.cursor is not None:
            self._cursor = resume.cursor.copy()
        else:
            self._cursor = Cursor.start(self._spec.readers)
        self._base = None if resume is None else resume.base
        self._begun = True

    def _epoch_draws(self) -> tuple[EpochDraws | None, EpochDraws | None]:
        """The epoch's per-sample crop and flip draws (training; loaders.augment.EpochDraws): drawn on
        the CPU, so that a batch augmented on a device gets the same ones; (CPU table, device table)."""
        if not self.cfg.train:
            return None, None
        if self._draws is None or self._draws[0] != self._epoch:
            cpu = EpochDraws.draw(self.cfg.seed, self._epoch, self._spec.total)
            dev = cpu
            if self.device.type != "cpu" and not self._augment_in_reader:
                dev = EpochDraws(
                    cpu.dy.to(self.device), cpu.dx.to(self.device), cpu.flip.to(self.device), cpu.padding
                )
            self._draws = (self._epoch, cpu, dev)
        return self._draws[1], self._draws[2]

    # -- internals ---------------------------------------------------------------------------------
    def _stop_readers(self) -> None:
        if self._threads is not None:
            self._threads.stop()
            self._threads = None

    def _start(
        self, plan: EpochPlan, draws: EpochDraws | None, resume: list[ResumePoint] | None
    ) -> ReaderThreads | InlineReader:
        """This pass's readers: `workers` threads, or (0) one reader run in this thread."""
        workers = self.cfg.workers
        spec = self._spec
        if not self._states:
            self._states = [_ReaderState(spec, self._stages) for _ in range(spec.readers)]
        self._stop_readers()  # a pass abandoned earlier: its readers share the states
        following = None
        if any(s.read_ahead for s in self._states) and not last_epoch(self.cfg, plan.epoch):
            following = plan_epoch(spec, plan.epoch + 1).readers
        jobs = [
            functools.partial(
                reader_messages,
                spec,
                self._decoder,
                w,
                plan.epoch,
                plan.readers[w],
                state,
                draws if self._augment_in_reader else None,
                None if resume is None else resume[w],
                None if following is None else following[w],
            )
            for w, state in enumerate(self._states)
        ]
        if workers == 0:
            return InlineReader(jobs[0]())
        self._threads = ReaderThreads(jobs, QUEUE_DEPTH, name="wds-reader", stages=self._stages)
        return self._threads

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, Any, torch.Tensor]]:
        self._begun = False
        self._begin()  # a pass starts afresh: from the epoch's start or the loaded state's position
        resume = self._active_resume()
        plan = self._plan(self._epoch, None) if resume is None else resume.plan
        expected = self.samples
        cursor = self._cursor
        points = None
        if resume is not None and resume.points is not None:  # the replays load_state_dict made
            points = [p.copy() for p in resume.points]
        reader_draws, device_draws = self._epoch_draws()
        source = self._start(plan, reader_draws, points)
        yielded = 0
        checked = False
        self._epoch_skipped = 0
        batches = self._exact(source, cursor)
        try:
            for images, labels, keys, ids in batches:
                yielded += len(labels)
                if not checked and yielded + self._epoch_skipped >= expected:
                    # The batch that completes the epoch: whatever the readers still send must be no more
                    # samples, checked now, before it is handed out -- train.py stops after len() batches
                    # and closes this generator, so nothing after the last yield would ever run.
                    yielded += sum(len(rest[1]) for rest in batches)
                    self._check_epoch(yielded, expected)
                    checked = True
                images = self._finish(images, ids, device_draws)
                with self._stages.timed("transfer"):
                    labels = to_device(labels, self.device)
                self._progress.mark(ids.numpy())
                yield images, labels, keys, ids
            if not checked:
                self._check_epoch(yielded, expected)
            if resume is not None and self._resume is resume:
                self._resume = None  # served to its end: the epoch is whole again from now on
        finally:  # ended, failed or abandoned: its readers stop (a later pass's stay)
            source.stop()
            if self._threads is source:
                self._threads = None

    def _check_epoch(self, yielded: int, expected: int) -> None:
        """Raise unless the pass's samples were each yielded or skipped exactly once (in count)."""
        if yielded + self._epoch_skipped != expected:
            raise FeedrateError(
                f"wds loader yielded {yielded} samples in epoch {self._epoch} and skipped "
                f"{self._epoch_skipped}, expected {expected} in all"
            )

    def _exact(
        self, source: ReaderThreads | InlineReader, cursor: Cursor
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, Any, torch.Tensor]]:
        """Batches of exactly batch_size, the last one partial, taken from the readers in a fixed turn
        (round-robin; a reader that has ended leaves it): the readers' full batches go through as they
        are (no copy); only their short ones -- each reader's last, and with skip_bad one that lost an
        image -- are put together (`_cut`). `cursor` is kept up to date with every message taken; a
        resumed one first takes again the short batches that were waiting, and what its readers had
        already sent after them."""
        size = self.cfg.batch_size
        pending = cursor.pending
        for reader, batch, offset in cursor.refill:  # readers resumed exactly send these first
            images, labels, keys, ids = source.take(reader)
            pending.append(
                _Piece(
                    images[offset:],
                    labels[offset:],
                    keys and keys[offset:],
                    ids[offset:],
                    reader,
                    batch,
                    offset,
                )
            )
        cursor.refill = []
        for reader, done in enumerate(cursor.done):
            if done:
                message = source.take(reader)
                assert isinstance(message, EpochDone), "a resumed reader ends as it did"
            if reader not in cursor.turn:
                assert source.take(reader) is END, "a resumed reader ends as it did"
        have = sum(len(p.labels) for p in pending)
        for reader, message in in_turn(source, cursor.turn):
            if isinstance(message, EpochDone):
                cursor.done[reader] = True
                self._epoch_skipped += message.skipped
                continue
            batch = cursor.batches[reader]
            cursor.batches[reader] = batch + 1
            if len(message[1]) == size:
                yield message
                continue
            pending.append(_Piece(*message, reader, batch, 0))
            have += len(message[1])
            while have >= size:
                with self._stages.timed("augment"):  # batching, in the consumer
                    out = _cut(pending, size)
                have -= size
                yield out
        if pending:
            with self._stages.timed("augment"):
                last = _cut(pending, have)
            yield last

    def _finish(self, images: torch.Tensor, ids: torch.Tensor, draws: EpochDraws | None) -> torch.Tensor:
        with self._stages.timed("transfer"):
            images = to_device(images, self.device)
        if self._augment_in_reader:
            return images
        with self._stages.timed("augment"):
            if draws is not None:
                return draws.augment(images, ids, self._layout)
            return normalize(images, self._layout)


def _cut(pending: list[_Piece], size: int) -> tuple[torch.Tensor, torch.Tensor, Any, torch.Tensor]:
    """The first `size` samples of the pending pieces as one batch; taken pieces leave `pending`, a
    piece cut in two keeps its rest (its offset advanced)."""
    taken: list[tuple] = []
    need = size
    while need:
        piece = pending[0]
        n = len(piece.labels)
        if n <= need:
            pending.pop(0)
            taken.append((piece.images, piece.labels, piece.keys, piece.ids))
            need -= n
        else:
            keys = piece.keys
            taken.append((piece.images[:need], piece.labels[:need], keys and keys[:need], piece.ids[:need]))
            piece.images, piece.labels, piece.ids = piece.images[need:], piece.labels[need:], piece.ids[need:]
            piece.keys = keys and keys[need:]
            piece.offset += need
            need = 0
    if len(taken) == 1:
        return taken[0]
    images = torch.cat([t[0] for t in taken])
    labels = torch.cat([t[1] for t in taken])
    keys = [k for t in taken for k in t[2]] if taken[0][2] is not None else None
    ids = torch.cat([t[3] for t in taken])
    return images, labels, keys, ids
