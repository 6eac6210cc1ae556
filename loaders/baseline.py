"""The torchvision baseline: the seed's "built-in version provided by torchvision".

Semantics of `torchvision.datasets.CIFAR10`: the split's python batches are unpickled into one uint8
array, each sample becomes a PIL image, and a torchvision transform chain runs per sample (train:
RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize; test: ToTensor, Normalize),
batched by torch's DataLoader with `workers` processes. This is the per-sample Python path every other
loader is compared with, so it stays deliberately plain.

torchvision's own CIFAR10 class is not used: it checks the official md5 of every batch and refuses the
synthetic and custom datasets shardgen writes in the same layout. `CifarArrays` below is the same
dataset without that check.

Stage times (`stage_times()`, the loaders.stagetimes contract), measured where the work happens:
- `storage`: zero per epoch, reported as such: the split is read into memory once, when the loader is
  built (that read is the CSV's type 10/11 row, not an epoch's);
- `decode`: `Image.fromarray` per sample (the uint8 row to a PIL image: what decoding is here);
- `augment`: the transform chain per sample (crop, flip, ToTensor, Normalize) and the collate that
  stacks the samples into a batch;
- `queue`: the unpickling of each batch in the consumer (its tensors rebuilt from the worker's shared
  memory: the file descriptor received from the worker and mapped). Receiving the message itself is
  part of `DataLoader.__next__`, merged with the wait for a worker still making the batch, so it is not
  counted; with `workers=0` there is no hand-off and the figure stays zero. On CUDA the unpickling and
  pinning run in DataLoader's pin-memory thread (its CPU time is then that thread's);
- `transfer`: the host-to-device copies in the consumer (`to_device`).
Each worker process keeps its own counters (plain floats on its copy of the dataset, a few clock reads
per sample: tests/stage_cost.py measures what they cost) and sends their increments with every batch
(`_Collate`); the consumer merges them. Work a worker did for batches never taken (an epoch abandoned
with batches prefetched) is lost with them.

The split is read by `loaders.batches.load_split`: in place for a local root, fetched (verified by
sha256, recorded as a type 10/11 download) for `s3://` / `cos://`.

Order and resume (loaders.resume's contract): the epoch's order is `loaders.batches.SplitOrder`'s, the
tensor loader's: one permutation of the split from (seed, epoch) (identity for evaluation), dealt to the
ranks in turn, so rank r reads positions r, r+R, ... -- no repeats, parts that differ by at most one
sample (train.py's equal-steps rule then drops at most one per rank). It depends on (seed, epoch, the
split's size, rank, world size), not on the worker count. This replaces torch's RandomSampler and
DistributedSampler: DistributedSampler pads the parts to equal length with repeated samples, so an epoch
was not the split exactly once and a resumed epoch could not continue its order (the padding is where
the order ends). A `_Part` sampler serves the part; DataLoader hands batches on in sampler order
whatever the workers, so batch k holds the part's ids k*B..(k+1)*B-1 and the consumed set is marked
from the ids, without asking the workers. `state_dict()` is those ids; `load_state_dict()` makes the
epoch serve the remainder, dealt in turn to the current ranks: with unchanged counts exactly the order
an uninterrupted run reads next, with others every remaining sample once. The per-sample augmentation
(PIL transforms seeded per worker) is not reproduced on resume: the contract exempts this baseline.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision import transforms

from loaders.base import CIFAR10_MEAN, CIFAR10_STD, CROP_PADDING, Download, LoaderConfig, batches_for
from loaders.batches import SplitOrder, load_split
from loaders.options import BATCH_READER_OPTIONS, parse_options
from loaders.seeds import AUGMENT, epoch_seed
from loaders.shards import dataset_key, open_dataset
from loaders.stagetimes import STAGES, Snapshot, StageTimes
from loaders.transfer import pins, to_device


def cifar_transform(train: bool) -> Callable[[Image.Image], torch.Tensor]:
    """The per-sample transform chain of the classic CIFAR-10 recipe."""
    steps: list[Callable] = []
    if train:
        steps += [transforms.RandomCrop(32, padding=CROP_PADDING), transforms.RandomHorizontalFlip()]
    steps += [transforms.ToTensor(), transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
    return transforms.Compose(steps)


class CifarArrays(Dataset):
    """A map-style dataset over HWC uint8 images: a PIL image per sample, as torchvision's CIFAR10.

    It times each sample's two stages into `spent` (decode wall, decode CPU, augment wall, augment CPU
    seconds since `_Collate` last took them): plain floats of the process it runs in, since every
    DataLoader worker has its own copy of the dataset and runs one sample at a time."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform
        self.spent = [0.0, 0.0, 0.0, 0.0]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        wall0, cpu0 = time.perf_counter(), time.thread_time()
        image = Image.fromarray(self.images[index])
        wall1, cpu1 = time.perf_counter(), time.thread_time()
        out = self.transform(image)
        wall2, cpu2 = time.perf_counter(), time.thread_time()
        spent = self.spent
        spent[0] += wall1 - wall0
        spent[1] += cpu1 - cpu0
        spent[2] += wall2 - wall1
        spent[3] += cpu2 - cpu1
        return out, int(self.labels[index])


class _Unpickled:
    """A marker that becomes (perf_counter, thread_time) when it is unpickled: one before and one after
    a batch's tensors in the tuple a worker sends, so the consumer learns how long rebuilding them took
    (pickle rebuilds a tuple's items in order). Never pickled (workers=0), it stays a marker."""

    def __reduce__(self) -> tuple[Callable[[], tuple[float, float]], tuple]:
        return _clocks, ()


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.thread_time()


class _Collate:
    """DataLoader's collate_fn: the samples stacked into a batch (timed as `augment`), sent with the
    stage seconds the process spent on the batch since the last one (`CifarArrays.spent`)."""

    def __init__(self, dataset: CifarArrays) -> None:
        self.dataset = dataset

    def __call__(self, samples: list[tuple[torch.Tensor, int]]) -> tuple[Any, ...]:
        wall, cpu = time.perf_counter(), time.thread_time()
        images, labels = default_collate(samples)
        spent = self.dataset.spent
        spent[2] += time.perf_counter() - wall
        spent[3] += time.thread_time() - cpu
        increments = {
            "wall": {"decode": spent[0], "augment": spent[2]},
            "cpu": {"decode": spent[1], "augment": spent[3]},
        }
        spent[:] = [0.0, 0.0, 0.0, 0.0]
        return _Unpickled(), images, labels, _Unpickled(), increments


class _Part(Sampler[int]):
    """The sample ids of this rank's part of the epoch, in order; set before each epoch's iteration.

    The DataLoader keeps one sampler for its whole life (persistent workers included) and draws a fresh
    iterator of it every epoch, so the part is swapped here rather than the DataLoader rebuilt."""

    def __init__(self) -> None:
        self.ids = np.zeros(0, dtype=np.int64)

    def __iter__(self) -> Iterator[int]:
        return iter(self.ids.tolist())

    def __len__(self) -> int:
        return len(self.ids)


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave stopping to the main process, which shuts them down (and whose death they notice).

    Ctrl-C in a terminal and torchrun's forwarded SIGINT/SIGTERM reach the whole process group, workers
    included: a worker that took the signal itself printed a traceback from its exit handlers, or died
    of it and made the main process report a crashed worker while it was stopping cleanly.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class TorchvisionLoader:
    """DataLoader over the split's CIFAR python batches; yields device tensors (see loaders.base)."""

    decode_device = "cpu"

    def __init__(self, cfg: LoaderConfig) -> None:
        self.cfg = cfg
        self.options = parse_options("torchvision", cfg.options, BATCH_READER_OPTIONS)
        self.verify: bool = self.options.get("verify", True)  # sha256 of the batch files (run.json)
        self.device = torch.device(cfg.device)
        self.root = open_dataset(cfg.data, endpoint_url=cfg.endpoint_url)
        self._arrays = load_split(
            self.root, cfg.split, cfg.cache_dir, self.options.get("net") or None, self.verify
        )
        self.prefetch_plan = self._arrays.fetch_plan
        self.downloads: list[Download] = self._arrays.downloads
        images, labels = self._arrays.images, self._arrays.labels
        self.dataset = CifarArrays(images, labels, cifar_transform(cfg.train))
        self._stages = StageTimes()
        for stage in STAGES:  # all separable; storage stays zero (see the module docstring)
            self._stages.add(stage, 0.0, 0.0)
        # The epoch's order (one permutation of (seed, epoch), identity for evaluation), this rank's
        # part (every world_size-th sample, no repeats) and what was handed out: loaders.batches.SplitOrder,
        # the tensor loader's. The sampler serves the part; the DataLoader keeps it for its life.
        self._map = SplitOrder(
            "torchvision",
            cfg.split,
            len(self.dataset),
            cfg.seed,
            cfg.train,
            cfg.rank,
            cfg.world_size,
            dataset_key(self.root),
        )
        self.sampler = _Part()
        # The workers' base seed, reseeded in set_epoch: their augmentation is a function of (seed, epoch,
        # rank) (with workers=0 it is torch's global generator's, which train.py seeds once per run).
        self._generator = torch.Generator()
        self._generator.manual_seed(epoch_seed(cfg.seed, 0, cfg.rank, stream=AUGMENT))
        # Several ranks: workers are started once, not every epoch. A process in a torch.distributed group
        # has C++ threads that enter Python, and CPython before 3.11.10 / 3.12 can deadlock a child forked
        # while such a thread holds its thread-list lock (python/cpython#112275). Seen here: a DataLoader
        # worker hung in PyOS_AfterFork_Child at the ~200th per-epoch fork of a 2-rank gloo run.
        persistent = cfg.workers > 0 and cfg.world_size > 1
        self._loader = DataLoader(
            self.dataset,
            batch_size=cfg.batch_size,
            sampler=self.sampler,
            collate_fn=_Collate(self.dataset),
            num_workers=cfg.workers,
            pin_memory=pins(self.device),
            drop_last=False,
            generator=self._generator,
            worker_init_fn=_ignore_stop_signals if cfg.workers else None,
            persistent_workers=persistent,
        )

    # -- the loader protocol ----------------------------------------------------------------------------
    @property
    def samples(self) -> int:
        """This rank's samples in the current epoch: every world_size-th of the epoch's order (of its
        remainder while a loaded state is pending)."""
        return self._map.samples

    def __len__(self) -> int:
        return batches_for(self.samples, self.cfg.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        stages = self._stages
        ids = self._map.begin()
        bs = self.cfg.batch_size
        batches = batches_for(len(ids), bs)
        if batches == 0:  # a resumed epoch with nothing left for this rank: no workers started for it
            self._map.finish()
            return
        self.sampler.ids = ids
        # DataLoader yields batches in sampler order whatever the workers (in_order): batch k is
        # ids[k*bs:(k+1)*bs], marked as consumed when it is handed on.
        for k, (start, images, labels, end, increments) in enumerate(self._loader):
            stages.merge(increments)
            if isinstance(start, tuple):  # unpickled: the hand-off from a worker process
                stages.add("queue", max(0.0, end[0] - start[0]), max(0.0, end[1] - start[1]))
            with stages.timed("transfer"):
                images, labels = to_device(images, self.device), to_device(labels, self.device)
            self._map.mark(ids[k * bs : (k + 1) * bs])
            if k == batches - 1:
                self._map.finish()
            yield images, labels

    def state_dict(self) -> dict[str, Any]:
        """Where this rank is in the epoch (loaders.resume): the ids it has handed out. `exact` is None: the
        remainder dealt in turn is the uninterrupted run's order already (loaders.batches.SplitOrder); the
        per-sample PIL augmentation in the workers is not reproduced (the contract exempts it)."""
        return self._map.state_dict(self.cfg.workers)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Serve only the samples `state` has not consumed when its epoch is read (validated; the loader is
        left at that epoch)."""
        self._map.load_state_dict(state)
        self.set_epoch(self._map.epoch)

    def stage_times(self) -> Snapshot:
        """Cumulative stage seconds since the loader was built, the workers' included (module docstring)."""
        return self._stages.snapshot()

    def set_epoch(self, epoch: int) -> None:
        """The epoch to read: its order is a function of (seed, epoch).

        With workers the augmentation repeats too (each worker's seed derives from this generator); with
        `workers=0` it draws from torch's global generator, which train.py seeds once per run. Persistent
        workers (several ranks) are seeded once, at their first epoch: the augmentation then repeats for
        the same seed and sequence of epochs.
        """
        self._generator.manual_seed(epoch_seed(self.cfg.seed, epoch, self.cfg.rank, stream=AUGMENT))
        self._map.set_epoch(epoch)

    def stats(self) -> dict[str, int]:
        return self._arrays.stats().as_dict()

    def close(self) -> None:
        """Stop persistent workers (several ranks) or a capped epoch's workers now."""
        iterator = self._loader._iterator  # where torch keeps the workers of a persistent DataLoader
        if iterator is not None:
            iterator._shutdown_workers()
            self._loader._iterator = None
