"""The ceiling reference: a whole split resident on the device as one uint8 tensor (airbench's way).

The split is read once from any storage URL (the CIFAR python batches at the dataset root; a remote
fetch is recorded as a type 10/11 row) and copied to the device. Every epoch then costs only tensor ops
on the device: per batch one gather that crops and flips, and one uint8-to-float conversion with
normalisation. No decode, no per-sample Python, no worker processes:
what is left is the floor of any loader's cost, against which the others are judged.

Augmentation has the baseline's semantics (RandomCrop(32, padding=4) with zero fill, horizontal flip
with p=0.5, normalise). To make the crop a single gather, the training split is stored once as a padded
canvas holding each image next to its mirror image (N x 40 x 80 x 3 uint8, 480 MB for CIFAR-10's
training set). A crop is 32 runs of 32 pixels (96 contiguous bytes) of that canvas, and a flipped crop
is the same in the mirrored half, so one `index_select` of a batch's n*32 row starts, out of a
sliding-window view of the canvas's bytes (`unfold`, no copy), gathers the batch's crops. On one CPU
core that is 0.65 us per image, where picking single pixels out of a 6-d view of every crop window
cost 4.4-5.3 (the idea is loaders.augment's, for batches that are not resident). The float conversion
and the normalisation follow (`loaders.augment.normalize`, into the slot): batches are NCHW in
channels_last memory, as the crops' bytes lie.

Order, augmentation and resume (loaders.resume's contract):
- the epoch's order is `loaders.batches.SplitOrder`'s: one permutation of the split from (seed, epoch),
  drawn on the host (so each batch's sample ids are known there without asking the device), dealt to
  the ranks in turn (rank r: positions r, r+R, ...); validation reads the split in row order. It depends
  on (seed, epoch, the split's size, rank, world size), not on the worker count: the preparation
  threads fill batches whose ids are fixed already, and the consumer takes them in that order.
- each sample's crop and flip are its entry of the epoch's `EpochDraws` (seed, epoch), folded once an
  epoch into one int64 per sample (the canvas pixel where its crop starts), so a batch's crops are one
  lookup by sample id: a sample is cropped alike whichever rank or batch reads it, and a resumed epoch
  yields the pixels an uninterrupted one would have (the per-batch generator draws this replaced cost
  about as much as the lookup).
- `state_dict()` is the ids handed out in the epoch so far (marked as each batch is yielded);
  `load_state_dict()` makes the epoch serve its remainder, dealt in turn to the current ranks. `exact`
  is None: with unchanged counts that remainder is the uninterrupted run's continuation already
  (SplitOrder's docstring shows why), with others every remaining sample is read once.
- the epoch's part and crop table (two int64 per sample, 0.8 MB for CIFAR-10) are the only host-to-
  device copies an epoch makes, once, at its start.

Where the batches are prepared (`--workers N` means N preparation threads in the training process;
0: the training thread prepares each batch inside `next()`, as the wds loader's readers and
DataLoader's workers mean it):
- CUDA: in `next()`, as kernels queued on the current stream, whatever N; they run asynchronously
  behind the step already, so nothing more is needed.
- CPU, N >= 1: the ops would run inside `next()` and the step would wait for them (with an emulated or
  a slow step, data wait the training loop sees). Instead N threads (`Prefetch`; torch ops release the
  GIL) prepare each epoch's batches into preallocated buffers from one shared pool: thread i fills
  batches i, i+N, i+2N, ..., each thread at most `AHEAD` batches ahead of the consumer, who takes batch
  k from thread k % N. A batch depends only on its sample ids (their order and draws are fixed by the
  seed and epoch), so the batches and their order are the same for every N and however fast either
  side runs. Each thread runs torch with one intra-op thread (N threads, N cores). The threads never
  start the next epoch (its order depends on `set_epoch`); they stop when the epoch ends, is abandoned,
  or `close()` is called, and an exception in any of them is raised in the consumer when it reaches the
  batch that thread was preparing (the batches before it arrive first).
- CPU, N = 0 (`Inline`): each batch is prepared in `next()`, in the consumer's thread; nothing runs
  ahead.

Stage times (`stage_times()`, the loaders.stagetimes contract): `augment` is the preparation of each
batch (gather, crop, flip, float conversion, normalisation, labels) -- in the preparation threads
(summed over them, each fill's CPU time its own thread's), with workers=0 in the consumer's thread and
marked as the consumer's, or on CUDA the CPU's side of queueing those kernels in `next()` (the GPU runs
them behind the step: their GPU time is the step's); `queue` is the consumer taking a batch a thread has
ready (a wait for one still being prepared is not counted). `storage`, `decode` and `transfer` are
zero per epoch, and reported as such: the split was read, unpickled and copied to the device once,
when the loader was built (the CSV's type 10/11 row); no epoch reads or decodes anything, and its only
copy from the host (the ids and crop table at its start) is too small to count.

A yielded CPU batch lives in a pooled buffer (N * AHEAD + HELD of them, 3 MB each at batch 256) that
is refilled once two later batches have been taken, unless something still holds it then (a reference
to the tensors, a view of them, a numpy array over them): such a buffer is left to its holder and
replaced by a fresh one, so a caller that keeps batches (`list(loader)`) never sees one overwritten.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from feedrate.errors import FeedrateError
from loaders.augment import EpochDraws, normalize
from loaders.base import CROP_PADDING, Download, LoaderConfig, batches_for
from loaders.batches import SplitOrder, load_split
from loaders.handoff import keep_consumer_threads, worker_torch_threads
from loaders.options import BATCH_READER_OPTIONS, parse_options
from loaders.shards import dataset_key, open_dataset
from loaders.stagetimes import STAGES, Snapshot, StageTimes
from loaders.transfer import to_device

# Batches each CPU preparation thread prepares ahead of the consumer: two hide one slow preparation
# behind a step without holding more memory (3 MB a batch of 256) than that needs.
AHEAD = 2
# The consumer holds up to two buffers at once: the batch it asked for, and the one before, still bound
# to the caller's loop variable while `next()` runs.
HELD = 2
POLL_S = 0.1  # how often a waiting side looks whether the other has stopped


@dataclass
class Slot:
    """One preallocated batch: the buffers a preparation fills and the number of samples in them."""

    images: torch.Tensor  # (batch, 3, 32, 32) float32
    labels: torch.Tensor  # (batch,) int64
    n: int = 0

    def held_elsewhere(self) -> bool:
        """Whether anything besides this slot still refers to its buffers: another reference to the
        tensor objects, or a view or numpy array over their memory."""
        # getrefcount sees this attribute and its own argument: 2 when nothing else holds the tensor
        return (
            sys.getrefcount(self.images) > 2
            or sys.getrefcount(self.labels) > 2
            or _storage_users(self.images) > 2
            or _storage_users(self.labels) > 2
        )


def _storage_users(tensor: torch.Tensor) -> int:
    """How many owners the tensor's memory has; 2 when only the tensor and the storage object asked
    here hold it. Views and numpy arrays over it add one each, which the tensor's refcount misses.
    Where torch lacks the counter, a large number: every buffer then counts as held (fresh ones are
    made), which costs an allocation but never overwrites a batch someone kept."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return sys.maxsize
    return int(use_count(tensor.untyped_storage()._cdata))


class Failure:
    """An exception raised in a preparation thread, carried to the consumer."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


THREAD_NAME = "tensor-prefetch"  # preparation thread i is named f"{THREAD_NAME}-{i}"


@dataclass
class Lane:
    """One preparation thread's share of an epoch: batches k = i, i + N, i + 2N, ... (thread i of N),
    handed to the consumer in that order through `ready`; `room` lets at most AHEAD of them be prepared
    and not yet taken."""

    room: threading.Semaphore
    ready: queue.SimpleQueue[object]
    thread: threading.Thread


class Prefetch:
    """`fill(slot, k)` for k in range(batches) in `threads` daemon threads: thread i of N fills the
    batches k with k % N == i, each thread at most `ahead` batches ahead of the consumer, and `get()`
    returns them in order k = 0, 1, ... (from thread k % N's queue), so the sequence does not depend on N
    or on how the threads are scheduled. Slots come from one pool shared by the threads, made by
    `new_slot` (N * ahead + HELD of them: every thread can hold `ahead` while the consumer holds HELD,
    so none ever waits for a slot the others hold); `give_back` returns one the consumer no longer uses.

    Each thread runs torch with one intra-op thread, so N threads use N cores, and the consumer's own
    count is fixed before any of them starts (loaders.handoff: keep_consumer_threads,
    worker_torch_threads, and why).
    """

    def __init__(
        self,
        batches: int,
        fill: Callable[[Slot, int], None],
        new_slot: Callable[[], Slot],
        ahead: int,
        stages: StageTimes | None = None,
        threads: int = 1,
    ) -> None:
        if threads < 1 or ahead < 1:
            raise ValueError(f"Prefetch needs threads >= 1 and ahead >= 1, not {threads} and {ahead}")
        self._stages = stages  # each fill counted as `augment` (its thread's CPU time), a hand-off as `queue`
        self._fill = fill
        self._new_slot = new_slot
        self._batches = batches
        self._taken = 0  # batches handed to the consumer so far: the next is batch self._taken
        threads = max(1, min(threads, batches))  # a thread with no batch to prepare is not started
        self._free: queue.SimpleQueue[Slot] = queue.SimpleQueue()
        for _ in range(threads * ahead + HELD):
            self._free.put(new_slot())
        self._stop = threading.Event()
        keep_consumer_threads()
        self._lanes = [
            Lane(
                threading.Semaphore(ahead),
                queue.SimpleQueue(),
                threading.Thread(target=self._run, args=(i, threads), name=f"{THREAD_NAME}-{i}", daemon=True),
            )
            for i in range(threads)
        ]
        try:
            for lane in self._lanes:
                lane.thread.start()
        except BaseException:
            self.stop()
            raise

    def _run(self, first: int, step: int) -> None:
        worker_torch_threads()
        lane = self._lanes[first]
        try:
            for k in range(first, self._batches, step):
                slot = self._next_slot(lane)
                if slot is None:
                    return
                if self._stages is None:
                    self._fill(slot, k)
                else:
                    with self._stages.timed("augment"):
                        self._fill(slot, k)
                lane.ready.put(slot)
        except BaseException as exc:  # everything reaches the consumer
            lane.ready.put(Failure(exc))

    def _next_slot(self, lane: Lane) -> Slot | None:
        """A free slot once the lane has room for another batch ahead; None when told to stop."""
        while not lane.room.acquire(timeout=POLL_S):
            if self._stop.is_set():
                return None
        while not self._stop.is_set():
            try:
                return self._free.get(timeout=POLL_S)
            except queue.Empty:
                continue
        return None

    def get(self) -> Slot | None:
        """The next prepared batch, or None after the last; an exception of the thread that was to
        prepare it is raised here (the batches before it have been returned)."""
        if self._taken == self._batches:
            return None
        lane = self._lanes[self._taken % len(self._lanes)]
        item = self._ready_now(lane)
        while item is None:
            try:
                item = lane.ready.get(timeout=POLL_S)
            except queue.Empty:
                if not lane.thread.is_alive() and lane.ready.empty():
                    raise RuntimeError(
                        f"the tensor loader's preparation thread {lane.thread.name} stopped without "
                        f"batch {self._taken}"
                    ) from None
        if isinstance(item, Failure):
            raise item.exc
        lane.room.release()
        self._taken += 1
        assert isinstance(item, Slot)
        return item

    def _ready_now(self, lane: Lane) -> object | None:
        """The lane's next item when it is ready already (its hand-off timed as `queue`), else None."""
        try:
            if self._stages is None:
                return lane.ready.get_nowait()
            with self._stages.timed("queue"):
                return lane.ready.get_nowait()
        except queue.Empty:
            return None

    def give_back(self, slot: Slot) -> None:
        """Return a slot the consumer is done with; one still held elsewhere is left to its holder and a
        fresh slot takes its place."""
        self._free.put(self._new_slot() if slot.held_elsewhere() else slot)

    def stop(self) -> None:
        """Stop every thread (each finishes the batch it is filling) and wait for them; safe to call
        twice."""
        self._stop.set()
        for lane in self._lanes:
            if lane.thread is not threading.current_thread() and lane.thread.ident is not None:
                lane.thread.join()


class Inline:
    """`workers=0`: each batch prepared in the consumer's own thread, inside `get()`, with `Prefetch`'s
    get/give_back/stop. Its `augment` is on the consumer's path and marked so (loaders.stagetimes
    `consumer`); there is no hand-off (`queue` stays zero). Slots are made as needed: HELD + 1 at most
    while nothing keeps a batch."""

    def __init__(
        self,
        batches: int,
        fill: Callable[[Slot, int], None],
        new_slot: Callable[[], Slot],
        stages: StageTimes | None = None,
    ) -> None:
        self._batches = batches
        self._fill = fill
        self._new_slot = new_slot
        self._stages = stages
        self._taken = 0
        self._free: list[Slot] = []

    def get(self) -> Slot | None:
        """The next batch, prepared now, or None after the last."""
        if self._taken == self._batches:
            return None
        slot = self._free.pop() if self._free else self._new_slot()
        if self._stages is None:
            self._fill(slot, self._taken)
        else:
            with self._stages.timed("augment", consumer=True):
                self._fill(slot, self._taken)
        self._taken += 1
        return slot

    def give_back(self, slot: Slot) -> None:
        """As `Prefetch.give_back`."""
        self._free.append(self._new_slot() if slot.held_elsewhere() else slot)

    def stop(self) -> None:
        """Nothing runs apart from the consumer."""


class TensorLoader:
    """Device-resident split; batches are gathered, cropped, flipped and normalised on the device."""

    def __init__(self, cfg: LoaderConfig) -> None:
        self.cfg = cfg
        self.options = parse_options("tensor", cfg.options, BATCH_READER_OPTIONS)
        self.verify: bool = self.options.get("verify", True)  # sha256 of the batch files (run.json)
        self.device = torch.device(cfg.device)
        self.decode_device = self.device.type
        self.root = open_dataset(cfg.data, endpoint_url=cfg.endpoint_url)
        t0 = time.perf_counter()
        arrays = load_split(self.root, cfg.split, cfg.cache_dir, self.options.get("net") or None, self.verify)
        self.prefetch_plan = arrays.fetch_plan
        images = to_device(torch.from_numpy(arrays.images), self.device)  # (N, 32, 32, 3) uint8
        self.labels = to_device(torch.from_numpy(arrays.labels), self.device)
        self._n = len(self.labels)
        pad = CROP_PADDING
        self._images: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None
        if cfg.train:
            n, h, w, c = images.shape
            hp, wp = h + 2 * pad, w + 2 * pad
            canvas = images.new_zeros((n, hp, 2 * wp, c))
            canvas[:, pad : pad + h, pad : pad + w] = images
            canvas[:, pad : pad + h, wp + pad : wp + pad + w] = images.flip(2)
            # every run of w pixels of the canvas, one per pixel start (a view: no copy)
            self._rows = canvas.view(-1).unfold(0, w * c, c)
            self._canvas_row = 2 * wp  # pixels per canvas row
            self._canvas_image = hp * 2 * wp  # pixels per image of the canvas
            self._row_offsets = torch.arange(h, device=self.device) * self._canvas_row
            self._mirror_base = wp + 2 * pad
            self._image_shape = (h, w, c)
            del images
        else:
            self._images = images  # (N, 32, 32, 3): batches of it are NCHW in channels_last memory
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.downloads: list[Download] = arrays.downloads
        if self.downloads:  # the copy to the device is part of preparing the data in memory
            self.downloads[-1].duration = (self.downloads[-1].duration - self.downloads[-1].loading) + (
                time.perf_counter() - t0
            )
        self._stats = arrays.stats()
        self._epoch = 0
        # the epoch's order, this rank's part, what was handed out (loaders.batches.SplitOrder)
        self._map = SplitOrder(
            "tensor",
            cfg.split,
            self._n,
            cfg.seed,
            cfg.train,
            cfg.rank,
            cfg.world_size,
            dataset_key(self.root),
        )
        self._starts: tuple[int, torch.Tensor] | None = None  # (epoch, each sample's crop start)
        self._prefetch: Prefetch | Inline | None = None  # the CPU preparation of the epoch being read
        self._stages = StageTimes()
        for stage in STAGES:  # all separable; storage, decode and transfer stay zero (module docstring)
            self._stages.add(stage, 0.0, 0.0)

    @property
    def samples(self) -> int:
        """This rank's samples in the current epoch: every world_size-th of the epoch's order (of its
        remainder while a loaded state is pending)."""
        return self._map.samples

    def __len__(self) -> int:
        return batches_for(self.samples, self.cfg.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        self._map.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        """Where this rank is in the epoch (loaders.resume): the ids it has handed out. `exact` is None:
        the remainder dealt in turn is the uninterrupted continuation already (loaders.batches.SplitOrder),
        and each sample's augmentation is its own (EpochDraws), so nothing else is needed."""
        return self._map.state_dict(self.cfg.workers)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Serve only the samples `state` has not consumed when its epoch is read (validated; the loader is
        left at that epoch)."""
        self._map.load_state_dict(state)
        self._epoch = self._map.epoch

    def stats(self) -> dict[str, int]:
        return self._stats.as_dict()

    def stage_times(self) -> Snapshot:
        """Cumulative stage seconds since the loader was built (see the module docstring)."""
        return self._stages.snapshot()

    def close(self) -> None:
        """Stop the CPU preparation threads, then free the resident split now (on a GPU, its memory goes
        back to the caching allocator). Safe to call twice."""
        self._stop_prefetch()
        self._images = self._rows = None

    def _stop_prefetch(self) -> None:
        prefetch, self._prefetch = self._prefetch, None
        if prefetch is not None:
            prefetch.stop()

    def order(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, in iteration order, on the device (drawn on the
        host, copied once an epoch)."""
        return self._device_ids(self._map.part())

    def _device_ids(self, ids: np.ndarray) -> torch.Tensor:
        return to_device(torch.from_numpy(ids), self.device)

    def _crop_starts(self) -> torch.Tensor:
        """Every sample's crop for the current epoch, as the canvas pixel where its first row starts: the
        `EpochDraws` of (seed, epoch) (drawn on the CPU, so the CPU and a GPU crop alike) folded into one
        int64 per sample, once an epoch, so that a batch's crops are one lookup by sample id."""
        if self._starts is None or self._starts[0] != self._epoch:
            draws = EpochDraws.draw(self.cfg.seed, self._epoch, self._n)
            # A flipped crop at column dx is the mirrored half's window at 2*pad - dx.
            col = torch.where(draws.flip, self._mirror_base - draws.dx, draws.dx)
            starts = torch.arange(self._n) * self._canvas_image + draws.dy * self._canvas_row + col
            self._starts = (self._epoch, to_device(starts, self.device))
        return self._starts[1]

    def _new_slot(self) -> Slot:
        bs = self.cfg.batch_size
        shape, cl = (bs, 3, 32, 32), torch.channels_last  # as normalize writes a batch of NHWC memory
        return Slot(
            torch.empty(shape, dtype=torch.float32, device=self.device, memory_format=cl),
            torch.empty(bs, dtype=self.labels.dtype, device=self.device),
        )

    def _filler(self, order: torch.Tensor) -> Callable[[Slot, int], None]:
        """fill(slot, k): batch k of this epoch (of `order`, this rank's ids) into `slot`. A batch depends
        on its ids alone (each sample's crop and flip are the epoch's draw for it), in any order of k."""
        bs = self.cfg.batch_size
        crop_starts = self._crop_starts() if self.cfg.train else None

        def fill(slot: Slot, k: int) -> None:
            idx = order[k * bs : (k + 1) * bs]
            n = slot.n = len(idx)
            if crop_starts is None:
                assert self._images is not None, "__iter__ checks that the loader is open"
                crops = self._images[idx].permute(0, 3, 1, 2)  # (n, C, H, W) uint8, NHWC memory
            else:
                assert self._rows is not None, "__iter__ checks that the loader is open"
                first = crop_starts.index_select(0, idx)  # where each crop's row 0 starts
                starts = (first[:, None] + self._row_offsets[None, :]).view(-1)
                crops = self._rows.index_select(0, starts).view(n, *self._image_shape).permute(0, 3, 1, 2)
            normalize(crops, "NCHW", out=slot.images[:n])  # float32, normalised, into the slot
            torch.index_select(self.labels, 0, idx, out=slot.labels[:n])

        return fill

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._images is None and self._rows is None:
            raise FeedrateError(f"the tensor loader of {self.root.url} was closed; make a new one to read it")
        self._stop_prefetch()  # an abandoned epoch's threads, if its iterator is still alive
        ids = self._map.begin()  # this rank's part, on the host: each batch's ids are marked from it
        fill = self._filler(self._device_ids(ids))
        bs = self.cfg.batch_size
        batches = batches_for(len(ids), bs)
        if batches == 0:  # a resumed epoch with nothing left for this rank
            self._map.finish()
            return
        if self.device.type == "cuda":  # asynchronous already: kernels queued behind the step
            for k in range(batches):
                slot = self._new_slot()
                with self._stages.timed("augment"):
                    fill(slot, k)
                self._handed_out(ids, k, batches)
                yield slot.images[: slot.n], slot.labels[: slot.n]
            return
        yield from self._prefetched(ids, batches, fill)

    def _handed_out(self, ids: np.ndarray, k: int, batches: int) -> None:
        """Batch k of `batches` is about to be yielded: its ids are consumed (loaders.resume)."""
        bs = self.cfg.batch_size
        self._map.mark(ids[k * bs : (k + 1) * bs])
        if k == batches - 1:
            self._map.finish()

    def _prefetched(
        self, ids: np.ndarray, batches: int, fill: Callable[[Slot, int], None]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches from `workers` preparation threads (`Prefetch`), or with workers=0
        prepared in this thread (`Inline`); a slot goes back when the batch two after it is taken (see the
        module docstring), and the threads stop when this generator ends in any way."""
        workers = self.cfg.workers
        prefetch: Prefetch | Inline
        if workers == 0:
            prefetch = Inline(batches, fill, self._new_slot, self._stages)
        else:
            prefetch = Prefetch(batches, fill, self._new_slot, AHEAD, self._stages, workers)
        self._prefetch = prefetch
        held: list[Slot] = []
        try:
            k = 0
            while (slot := prefetch.get()) is not None:
                if len(held) == HELD:
                    prefetch.give_back(held.pop(0))
                held.append(slot)
                images, labels = slot.images[: slot.n], slot.labels[: slot.n]
                self._handed_out(ids, k, batches)
                k += 1
                yield images, labels
                del images, labels
        finally:
            prefetch.stop()
            if self._prefetch is prefetch:
                self._prefetch = None
