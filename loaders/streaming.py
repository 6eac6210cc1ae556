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
  arrive, local or remote, and checked against the manifest before any of its samples is used. A part
  of a shard cannot be checked against the whole shard's sha256, so under `verify` readers take whole
  shards only (partition.py's ranged units are not made for workers; a reader left without a shard
  idles, and a rank that must share a shard reads all of it). `verify=false` opts out (the loader's
  `verify` attribute says which; `stats()["verified_bytes"]` counts the bytes checked).
- Shuffling (training only): the shard order is shuffled per epoch, then samples are drawn at random
  from a buffer of `shuffle_buffer` samples (default 4,096, about 1.6 shards of 2,500; the shards
  themselves were shuffled when written). Seeded by (seed, epoch, rank, worker): the same seed and
  worker count give the same epoch. Validation reads shards in order, unshuffled.
- Readers decode whole batches into one uint8 array each, every image written in place into its row
  (decode.py: simplejpeg for jpg, OpenCV for png, a numpy gather for raw). Batches stay uint8 until
  the one augmentation pass per batch (augment.py): random crop with 4-pixel zero padding and
  horizontal flip (training), conversion to float32 and normalisation (always) -- the torchvision
  baseline's transforms, batched. Where it runs (`augment_at`): with a GPU, on the GPU, after the
  uint8 batch (4x fewer bytes than float32), pinned by its reader, is copied there without blocking;
  on the CPU, in the reader threads (in parallel; the consumer only hands batches on), or in the
  consumer's thread with `--workers 0`.
- Batches of exactly `batch_size`: each reader draws full batches, handed on as they are (no copy);
  only the short ones -- each reader's last, and with `skip_bad` one that lost an image -- are joined
  by the consumer, so an epoch has one partial batch, the last.
- Deterministic by (seed, epoch, worker count): each reader's order and augmentation are seeded by
  (seed, epoch, rank, reader), and the consumer takes the readers' batches in a fixed turn (one queue
  per reader, round-robin), never first-come.
- Exactly once: partition.py deals disjoint sample ranges to ranks and workers, and the loader checks
  that an epoch yields exactly `samples` samples. The check runs before the batch that completes
  `samples` is handed out (the readers are drained first and must have nothing more), since train.py
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

Options (`LoaderConfig.options`; strings such as "true" or "8" are accepted from a command line):
`verify` (bool, default true), `shuffle_buffer` (samples, >= 0), `decode` (by encoding: raw auto |
numpy; jpg auto | simplejpeg | opencv | torchvision | pil; png auto | opencv | torchvision | pil),
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
current depths, summed, in `stats()["prefetch_depth"]`. Remote training readers also read ahead across
the epoch boundary: once the last shard of an epoch is on its way, the first shards of the next one
are fetched too, so an epoch does not open with a wait (not with `skip_bad`, whose skips are counted
in the epoch that loads them, nor with `cache_dir`, whose later epochs read local copies).
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
from (about 2 at the default sizes), and up to QUEUE_DEPTH batches waiting for the consumer; no second
copy of torch, since readers are threads.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from feedrate import network
from feedrate.errors import FeedrateError
from feedrate.manifest import Manifest
from feedrate.shardformat import ShardError, ShardIndex
from feedrate.storage import open_store
from loaders.augment import augment, normalize
from loaders.base import Download, LoaderConfig, batches_for
from loaders.decode import DECODERS, Decoder, decode_choices
from loaders.handoff import ReaderThreads
from loaders.options import choice, count, flag, net_preset, parse_options
from loaders.partition import Unit, rank_units, worker_units
from loaders.seeds import AUGMENT, ORDER, epoch_seed
from loaders.shards import DatasetRoot, ShardFetcher, ShardRef, open_dataset
from loaders.stages import LoadedUnit, SkipLog, decoded, drawn, load_unit, prefetched, transformed
from loaders.stagetimes import STAGES, Snapshot, StageTimes
from loaders.stats import LoaderStats
from loaders.transfer import pins, to_device

DEFAULT_SHUFFLE_BUFFER = 4096
DEFAULT_PREFETCH = 1
AUGMENT_AT = ("auto", "reader", "device")
INDEX_READERS = 8  # threads reading index files when the loader is built (remote: latency-bound)
QUEUE_DEPTH = 3  # batches each reader thread may have waiting for the consumer


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
    read_ahead: bool = True  # remote training data: start the next epoch's first shards early

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
        }
        return cls(**parse_options("wds", options, declared))


@dataclass(frozen=True)
class StreamSpec:
    """Everything a reader process needs, fixed when the loader is built (sent to the workers)."""

    url: str
    endpoint_url: str | None
    manifest: Manifest
    refs: tuple[ShardRef, ...]
    indexes: tuple[ShardIndex, ...]
    unusable: tuple[str, ...]  # per shard: why it cannot be used at all ("" when it can; skip_bad only)
    units: tuple[Unit, ...]  # this rank's units
    rank: int
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


# -- the reader: one per reader thread (or the consumer's thread) ---------------------------------
class _ReaderState:
    """Per-reader resources, kept across epochs: a store client of its own (its counters are this
    reader's), a fetch thread pool, a skip log, and the loads read ahead into the next epoch."""

    def __init__(self, spec: StreamSpec, stages: StageTimes) -> None:
        self.stages = stages  # the loader's: every reader adds to it
        store = open_store(spec.url, endpoint_url=spec.endpoint_url)
        self.fetcher = ShardFetcher(DatasetRoot(store, spec.manifest), spec.cache_dir, spec.options.verify)
        # A measured link is re-measured on the shard GETs themselves and the depth follows (`depth`),
        # up to network.MAX_DEPTH fetches at once; otherwise the depth is fixed.
        self.adaptive = spec.adaptive
        self.depth = max(1, spec.prefetch)
        self._spec = spec
        self.pool = ThreadPoolExecutor(
            max_workers=network.MAX_DEPTH if self.adaptive else self.depth, thread_name_prefix="wds-fetch"
        )
        self.skips = SkipLog("wds") if spec.options.skip_bad else None
        # Reading ahead into the next epoch: remote training data only (local reads are fast), and not
        # when skipping bad samples (a skip is counted in the epoch that loads its shard).
        # Not with a cache directory either: from the second epoch on, shards come from local disk.
        self.read_ahead = (
            spec.options.read_ahead
            and spec.train
            and not store.is_local
            and not spec.options.skip_bad
            and spec.cache_dir is None
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
    spec: StreamSpec, decoder: Decoder, worker: int, workers: int, epoch: int, state: _ReaderState
) -> Iterator[tuple | EpochDone]:
    """Reader `worker` of `workers`' epoch: (images, labels, keys | None) per batch, then EpochDone.

    The pipeline: units -> loaded shards -> drawn batches -> decoded uint8 -> augmented float32 (when the
    readers augment) or pinned uint8 (bound for CUDA). Every batch holds `batch_size` samples but the
    reader's last one (and, with skip_bad, one that lost an undecodable image)."""
    skipped_before = state.stats().skipped
    units = worker_units(spec.units, worker, workers, epoch, spec.seed, shuffle=spec.train)
    classes = len(spec.manifest.class_names)

    stages = state.stages

    def load(unit: Unit) -> LoadedUnit:
        # in a fetch thread: its CPU seconds are storage's; its wall time is the reader's only where the
        # reader waits for it (counted by `prefetched`)
        ref, index, unusable = spec.refs[unit.shard], spec.indexes[unit.shard], spec.unusable[unit.shard]
        cpu = time.thread_time()
        try:
            return load_unit(unit, ref, index, state.fetcher, classes, state.skips, unusable)
        finally:
            stages.add("storage", 0.0, time.thread_time() - cpu)

    ready: list[Future] = []
    spill = None
    if state.read_ahead:
        ready = state.take_ahead(epoch, units)
        following = worker_units(spec.units, worker, workers, epoch + 1, spec.seed, shuffle=spec.train)
        spill = state.spill_to(epoch + 1, following)
    loaded = prefetched(units, load, state.pool, state.current_depth, ready, spill, stages)
    rng = (
        np.random.default_rng(epoch_seed(spec.seed, epoch, spec.rank, worker, ORDER)) if spec.train else None
    )
    buffer = spec.options.shuffle_buffer if spec.train else 0
    batches = decoded(
        drawn(loaded, spec.batch_size, buffer, rng, stages), decoder, spec.options.keys, state.skips, stages
    )
    if spec.augment_in_reader:
        seed = epoch_seed(spec.seed, epoch, spec.rank, worker, AUGMENT)
        generator = torch.Generator().manual_seed(seed)
        batches = transformed(batches, spec.train, decoder.layout, generator, stages)
    elif spec.pin:
        batches = _pinned(batches, stages)
    yield from batches
    yield EpochDone(state.stats().skipped - skipped_before)


def _pinned(batches: Iterator[tuple], stages: StageTimes) -> Iterator[tuple]:
    """uint8 batches bound for CUDA, pinned by the reader (counted as `transfer`)."""
    for images, labels, keys in batches:
        with stages.timed("transfer"):
            images = images.pin_memory()
        yield images, labels, keys


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
        # verified reading: whole shards per worker (a range of one cannot be checked; module docstring)
        workers_split = 1 if self.options.verify else cfg.workers
        units = rank_units([r.samples for r in refs], workers_split, rank, world_size)
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
        spec = StreamSpec(
            url=root.url if root.store.is_local else cfg.data,
            endpoint_url=cfg.endpoint_url,
            manifest=root.manifest,
            refs=tuple(refs),
            indexes=tuple(indexes),
            unusable=tuple(unusable),
            units=tuple(units),
            rank=rank,
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
        )
        self._spec = spec
        self._decoder = DECODERS[(root.manifest.encoding, self.options.decode)]
        self._decoder.prepare()
        self.samples = sum(u.samples for u in units)
        self.downloads: list[Download] = []
        self.decode_device = "cpu"
        self._augment_in_reader = at == "reader"
        self._layout = self._decoder.layout
        self._epoch = 0
        self._rank = rank
        self._states: list[_ReaderState] = []  # one per reader, made on first use, kept across epochs
        self._threads: ReaderThreads | None = None  # the reader threads of the pass under way
        self._epoch_skipped = 0  # samples the readers skipped in the epoch being read
        self._stages = StageTimes()  # every reader's and the consumer's stage seconds (module docstring)

    def __len__(self) -> int:
        return batches_for(self.samples, self.cfg.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, _ in self._batches():
            yield images, labels

    def iter_keyed(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        """Like iteration, plus each batch's sample keys (needs the `keys` option)."""
        if not self.options.keys:
            raise FeedrateError("iter_keyed() needs the wds option keys=True")
        yield from self._batches()

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
        """The index reads made here and every reader's counters, summed."""
        total = self._fetcher.stats(prefetch_depth=0)
        for state in self._states:
            total += state.stats()
        return total.as_dict()

    # -- internals ---------------------------------------------------------------------------------
    def _stop_readers(self) -> None:
        if self._threads is not None:
            self._threads.stop()
            self._threads = None

    def _messages(self) -> Iterator[tuple | EpochDone]:
        """This epoch's messages from the readers: `workers` threads, taken round-robin, or (0) one
        reader run in this thread."""
        workers = self.cfg.workers
        if not self._states:
            self._states = [_ReaderState(self._spec, self._stages) for _ in range(max(1, workers))]
        self._stop_readers()  # a pass abandoned earlier: its readers share the states
        if workers == 0:
            return reader_messages(self._spec, self._decoder, 0, 1, self._epoch, self._states[0])
        jobs = [
            functools.partial(reader_messages, self._spec, self._decoder, w, workers, self._epoch, state)
            for w, state in enumerate(self._states)
        ]
        self._threads = ReaderThreads(jobs, QUEUE_DEPTH, name="wds-reader", stages=self._stages)
        return iter(self._threads)

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, Any]]:
        generator = torch.Generator(device=self.device)  # augmentation on the device (not in the readers)
        generator.manual_seed(epoch_seed(self.cfg.seed, self._epoch, self._rank, stream=AUGMENT))
        yielded = 0
        checked = False
        self._epoch_skipped = 0
        batches = self._exact(self._messages())
        threads = self._threads
        try:
            for images, labels, keys in batches:
                yielded += len(labels)
                if not checked and yielded + self._epoch_skipped >= self.samples:
                    # The batch that completes the epoch: whatever the readers still send must be no more
                    # samples, checked now, before it is handed out -- train.py stops after len() batches
                    # and closes this generator, so nothing after the last yield would ever run.
                    yielded += sum(len(rest[1]) for rest in batches)
                    self._check_epoch(yielded)
                    checked = True
                images = self._finish(images, labels, generator)
                with self._stages.timed("transfer"):
                    labels = to_device(labels, self.device)
                yield images, labels, keys
            if not checked:
                self._check_epoch(yielded)
        finally:
            if threads is not None:  # ended, failed or abandoned: its readers stop (a later pass's stay)
                threads.stop()
                if self._threads is threads:
                    self._threads = None

    def _check_epoch(self, yielded: int) -> None:
        """Raise unless the epoch's samples were each yielded or skipped exactly once (in count)."""
        if yielded + self._epoch_skipped != self.samples:
            raise FeedrateError(
                f"wds loader yielded {yielded} samples in epoch {self._epoch} and skipped "
                f"{self._epoch_skipped}, expected {self.samples} in all"
            )

    def _exact(
        self, messages: Iterator[tuple | EpochDone]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, Any]]:
        """Batches of exactly batch_size, the last one partial: the readers' full batches go through
        as they are (no copy); only their short ones -- each reader's last, and with skip_bad one that
        lost an image -- are put together (`_cut`)."""
        size = self.cfg.batch_size
        pending: list[tuple] = []
        have = 0
        for message in messages:
            if isinstance(message, EpochDone):
                self._epoch_skipped += message.skipped
                continue
            if len(message[1]) == size:
                yield message
                continue
            pending.append(message)
            have += len(message[1])
            while have >= size:
                with self._stages.timed("augment"):  # batching, in the consumer
                    batch, pending = _cut(pending, size)
                have -= size
                yield batch
        if pending:
            with self._stages.timed("augment"):
                last = _cut(pending, have)[0]
            yield last

    def _finish(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        with self._stages.timed("transfer"):
            images = to_device(images, self.device)
        if self._augment_in_reader:
            return images
        with self._stages.timed("augment"):
            if self.cfg.train:
                return augment(images, generator, self._layout)
            return normalize(images, self._layout)


def _cut(pending: list[tuple], size: int) -> tuple[tuple, list[tuple]]:
    """The first `size` samples of the pending pieces as one batch, and what is left."""
    taken: list[tuple] = []
    need = size
    while need:
        images, labels, keys = pending[0]
        if len(labels) <= need:
            taken.append(pending.pop(0))
            need -= len(labels)
        else:
            taken.append((images[:need], labels[:need], keys[:need] if keys else None))
            pending[0] = (images[need:], labels[need:], keys[need:] if keys else None)
            need = 0
    images = torch.cat([t[0] for t in taken]) if len(taken) > 1 else taken[0][0]
    labels = torch.cat([t[1] for t in taken]) if len(taken) > 1 else taken[0][1]
    keys = [k for t in taken for k in t[2]] if taken[0][2] is not None else None
    return (images, labels, keys), pending
