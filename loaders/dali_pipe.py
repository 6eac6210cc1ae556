"""The `dali` loader: NVIDIA DALI reads and decodes (on a GPU, augments too); batches arrive as torch
tensors on the device.

On a GPU, jpg is decoded by nvJPEG (`decoders.image` on device "mixed"), and crop, flip and
normalisation run on the GPU; DALI's buffers become torch tensors through DLPack, without a trip through
host memory. Without a GPU, or with `device="cpu"`, DALI's CPU operators (`device_id=None`) read and
decode, and the batch is cropped, flipped and normalised here by batched torch ops (loaders.augment),
seeded by (seed, epoch, rank): DALI's per-sample CPU operators cost five times as much at 32x32 (see
loaders.dali_ops). Those ops run on one torch thread: the cores are DALI's (`threads`), and torch's
own intra-op threads spinning against DALI's cost up to ten times the work (measured on 2 cores with
torch's default 2 threads: 47-247 against 18-22 CPU us per image; where torch has one thread already,
as train.py sets it with 2 workers on 2 cores, nothing changes).

The graph itself is in loaders.dali_ops; this module finds the shards, owns the pipeline's lifetime
and epoch bookkeeping, and turns DALI's output dicts into `(images, labels)`.

Shards are always read from local disk by DALI's webdataset reader, with shardgen's index files:
- a local dataset: the files in place;
- `s3://` / `cos://`: every shard and index file of the split is first copied whole by
  `loaders.localcopy.LocalFiles` into the dataset's directory of the cache (`cache_dir`, shared with
  every loader reading the same dataset; else a temporary one that `close()` removes), one GET per file,
  verified against the manifest's sha256. The fetch is recorded as a `Download` (CSV type 10 / 11).
  DALI's own `s3://` reading was not used: it issues about three ranged
  GETs per sample (168 img/s against a local endpoint).

Epochs are exact: every sample of this rank's part exactly once, the last batch partial, `len()` the
same every epoch (see loaders.dali_ops for the reader settings that make this so). DALI cannot restart a
pipeline in the middle of an epoch, so an epoch the caller abandons (train.py's --max-batches) is not
continued: the next `__iter__` builds a fresh pipeline, seeded by (seed, epoch), at a cost of tens of
milliseconds on the CPU. Epochs that run to the end go on with the same pipeline, whose reader
reshuffles by itself.

Several ranks (world_size > 1) must agree on each epoch's tar order, since their parts are ranges of it.
A pipeline that went on by itself and one built afresh for the same epoch order it differently, and
under torchrun the ranks do not all finish their epochs (train.py stops every rank at the shortest
rank's batch count, so a rank with one more batch abandons its epoch). So with several ranks every
training epoch starts a pipeline built for that epoch, seeded by (seed, epoch) alone: the same order
everywhere. (Evaluation reads in stored order and needs no such care.)

Knobs (`LoaderConfig.options`): threads (DALI's CPU thread count; default: `workers`, so `--workers N`
means N DALI threads here, else 2), prefetch (queue depth, default 2),
initial_fill (shuffle buffer, default 4096), hw_decoder_load (0-1, default 0.65), skip_bad (bool),
net (a feedrate.network preset: the link the cache fill sizes its concurrent GETs for; else
FEEDRATE_NET's, else measured; the choice is in `prefetch_plan`), verify (bool, default true: the
sha256 of every shard and index file read in place is checked before DALI sees it, as a copy's always
is; false keeps the size check only; the `verify` attribute says which).

Stage times (`stage_times()`, the contract of loaders.stagetimes), as far as this loader can see into
DALI. DALI's reader and decoder operators run on DALI's own threads, and DALI 2.4 has no per-operator
time: `Pipeline.executor_statistics()` (with `enable_memory_stats=True`, and only under
`exec_dynamic=False`) reports output memory sizes per operator and nothing else, and its profiling is
NVTX ranges for an external profiler (Nsight Systems). So:
- `decode` is the span the consumer spends getting the next batch out of DALI (`DALIGenericIterator`'s
  `next`, the copy of DALI's outputs into torch tensors included) plus building a pipeline (whose
  `read_ahead` reads the shards in). It includes reading the shards: storage and decode are merged,
  and `storage` is absent ("not separable"). On a GPU it also holds the augmentation and the images'
  copy to the device, which stay inside DALI there. Its CPU seconds are the process's
  (`time.process_time()`) over the span, so DALI's threads working in it count; DALI's work done ahead
  while the consumer is elsewhere (the step, the CPU augmentation) is in neither figure: they are what
  the consumer waits for, a lower bound of DALI's own busy time, and one reader's seconds (the wait on
  all of DALI's threads at once), not a sum over them.
- `augment` (the CPU path only): the label parsing (`label_rows`, batching work) and the torch crop,
  flip and normalisation, on the consumer's thread (`time.thread_time()`). On a GPU it is absent:
  merged into `decode`, and the label parsing is then not counted.
- `transfer`: the labels made a tensor and, on a GPU, copied to the device (`to_device`). On the CPU
  there is no copy: the stage is next to nothing, measured as such rather than left out.
- `queue`: absent (DALI's prefetch queue hand-off is inside `decode`'s span).
Measuring costs a wall and a CPU clock reading at each end of every span and a lock per stage: about
9 CPU us a batch (8.5 more than bare `with` blocks, 20,000 rounds), 0.03 us per image at 256 images a
batch, against 18-87 process CPU us per image for raw to png loader-only; whole raw epochs with and
without it (2 threads, medians of 8 alternating passes) ran 18.8 and 18.7 us per image, inside their
+-3 us spread. The stages add up to 56-78% of the process's CPU over an epoch (png 60 of 87 us, jpg 44
of 77, raw 14 of 18): the rest is mostly DALI's threads working ahead while the consumer augments,
which no stage holds (see `decode` above). All three stages are the consumer's (the step waits for
them), and they are marked so (`consumer=True`, loaders.stagetimes): training.stages' what-if figures
then do not divide them by the reader count as if readers ran them ahead of the step (unmarked, the
raw feed figure at --emulate 100000 read 57k img/s against 21k delivered).

Bad data: DALI's own errors name neither the shard nor the sample (a sample without a label is "an
underful sample at index line N", an undecodable image is a batch position), so when the pipeline fails
the loader looks for the culprit itself (loaders.shards.first_bad_sample) and names the shard and key.
With `skip_bad` (train.py's `--skip-bad`), what DALI can skip is skipped and counted in
`stats()["skipped"]`, with a line on stderr: samples that lack their image or label (the reader's
`missing_component_behavior="skip"`: they leave the epoch, counted once per epoch, on rank 0) and labels
that are not class numbers (dropped from their batch on the host). An image that does not decode stays
an error: DALI's decoders have no per-sample error policy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from feedrate.errors import FeedrateError
from loaders.augment import augment, normalize
from loaders.base import Download, LoaderConfig, batches_for
from loaders.decode import MAX_LABEL_DIGITS
from loaders.localcopy import LocalFiles
from loaders.options import count, flag, fraction, net_preset, parse_options
from loaders.seeds import AUGMENT, ORDER, epoch_seed
from loaders.shards import DatasetRoot, ShardRef, first_bad_sample, open_dataset
from loaders.stages import SkipLog
from loaders.stagetimes import Snapshot, StageTimes
from loaders.transfer import to_device

PACKAGE = "nvidia-dali-cuda120"


class DaliError(FeedrateError):
    """DALI could not read or decode the data (the message carries DALI's own reason)."""


@dataclass(frozen=True)
class DaliOptions:
    """The backend's knobs, validated (see the module docstring for what each does)."""

    threads: int = 2
    prefetch: int = 2
    initial_fill: int = 4096
    hw_decoder_load: float = 0.65
    skip_bad: bool = False
    net: str = ""  # a feedrate.network preset: the link the cache fill plans its concurrency for
    verify: bool = True  # sha256 of local shards checked before DALI reads them (copies: always)

    @classmethod
    def from_config(cls, options: Mapping[str, Any], workers: int) -> DaliOptions:
        """Options from `LoaderConfig.options`; `threads` defaults to the worker count (else 2)."""
        declared = {
            "threads": count(1),
            "prefetch": count(1),
            "initial_fill": count(1),
            "hw_decoder_load": fraction,
            "skip_bad": flag,
            "net": net_preset,
            "verify": flag,
        }
        return cls(**({"threads": workers or cls.threads} | parse_options("dali", options, declared)))


def import_dali() -> ModuleType:
    """loaders.dali_ops, after checking that DALI and its PyTorch plugin import here."""
    try:
        importlib.import_module("nvidia.dali")
        importlib.import_module("nvidia.dali.plugin.pytorch")
    except (ImportError, OSError) as exc:
        raise FeedrateError(
            f"loader 'dali' needs NVIDIA DALI, which does not import here ({exc}); "
            f"install it with: pip install {PACKAGE} (Linux x86-64 or aarch64)"
        ) from None
    return importlib.import_module("loaders.dali_ops")


def parse_labels(padded: np.ndarray, num_classes: int) -> np.ndarray:
    """Integer labels from `.cls` bytes: ASCII digits, NUL-padded at the end, one row per sample.

    Horner's rule column by column over the whole batch (a row's digits end where its padding starts).
    Anything that is not a class index is an error: a label of more than MAX_LABEL_DIGITS digits is
    refused before it is summed, since int64 wraps (a 20-digit label became a small class, or -100,
    CrossEntropy's ignore index), and so is one outside 0..num_classes-1.
    """
    labels, bad = label_rows(padded, num_classes)
    if bad.any():
        raise DaliError(_bad_label(padded, labels, bad, num_classes))
    return labels


def label_rows(padded: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, bad): `parse_labels` without raising; `bad` marks rows that are not a class index."""
    if padded.ndim != 2 or padded.shape[1] < 1:
        raise DaliError(f"label bytes have shape {padded.shape}; expected (batch, width)")
    present = padded != 0
    digits = padded.astype(np.int64) - ord("0")
    bad = ~present[:, 0] | (present & ((digits < 0) | (digits > 9))).any(axis=1)
    bad |= (present[:, 1:] & ~present[:, :-1]).any(axis=1)  # a NUL inside the text
    bad |= present.sum(axis=1) > MAX_LABEL_DIGITS  # before summing: int64 would wrap
    labels = np.where(bad, 0, digits[:, 0])
    for column in range(1, min(padded.shape[1], MAX_LABEL_DIGITS)):
        more = present[:, column] & ~bad
        if not more.any():
            break
        labels = np.where(more, labels * 10 + digits[:, column], labels)
    return labels, bad | (labels < 0) | (labels >= num_classes)


def _bad_label(padded: np.ndarray, labels: np.ndarray, bad: np.ndarray, num_classes: int) -> str:
    """What is wrong with the first bad label of a batch."""
    row = int(np.flatnonzero(bad)[0])
    text = bytes(padded[row]).rstrip(b"\0")
    if text.isdigit() and len(text) <= MAX_LABEL_DIGITS:
        return f"label {int(labels[row])} is outside the dataset's classes 0..{num_classes - 1}"
    shown = text if len(text) <= 40 else text[:40] + b"..."
    return (
        f"a .cls member holds {shown!r}; expected ASCII digits (at most {MAX_LABEL_DIGITS}) "
        f"of a class index 0..{num_classes - 1}"
    )


def rank_samples(total: int, rank: int, world_size: int) -> int:
    """This rank's samples: DALI's reader gives part i of n samples [floor(N i / n), floor(N (i+1) / n))."""
    return total * (rank + 1) // world_size - total * rank // world_size


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch ops in the block run on the calling thread alone (see the module docstring); the thread
    count is put back afterwards. Costs about half a microsecond a batch. The count is the calling
    thread's own (OpenMP keeps it per thread: other threads keep theirs)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _reason(exc: BaseException) -> str:
    """What a DALI error says went wrong, without the traceback of the graph it wraps it in."""
    text = str(exc)
    operator = re.search(r"operator `(?:nvidia\.dali\.)?([^`]+)`", text)
    cause = text.split("encountered:", 1)[1] if "encountered:" in text else text
    lines = [ln.strip() for ln in cause.splitlines() if ln.strip() and "no longer valid" not in ln]
    reason = " ".join(lines[:3]) or type(exc).__name__
    return f"{operator.group(1)}: {reason}" if operator else reason


class DaliLoader:
    """A DALI pipeline over a split's shards; yields `(images, labels)` on `cfg.device` (loaders.base)."""

    def __init__(self, cfg: LoaderConfig) -> None:
        self._ops = import_dali()
        self.cfg = cfg
        self.options = DaliOptions.from_config(cfg.options, cfg.workers)
        self.verify = self.options.verify
        self.device = torch.device(cfg.device)
        device_id = self._device_id()
        self.root: DatasetRoot = open_dataset(cfg.data, endpoint_url=cfg.endpoint_url)
        manifest = self.root.manifest
        if manifest.encoding not in self._ops.ENCODINGS:
            raise FeedrateError(
                f"{self.root.url} is encoded as {manifest.encoding!r}; the dali loader reads "
                f"{', '.join(self._ops.ENCODINGS)}"
            )
        refs = self.root.shards(cfg.split)
        total = sum(ref.samples for ref in refs)
        self.samples = rank_samples(total, cfg.rank, cfg.world_size)
        if self.samples < 1:
            raise FeedrateError(
                f"rank {cfg.rank} of {cfg.world_size} gets no samples: the {cfg.split} split has {total}"
            )
        self.num_classes = len(manifest.class_names)
        if device_id is None:
            self.decode_device = "cpu"
        else:  # raw needs no decoding: its crop, flip and normalisation run on the GPU
            self.decode_device = "cuda" if manifest.encoding == "raw" else "mixed"
        self.downloads: list[Download] = []
        self._skips = SkipLog("dali") if self.options.skip_bad else None
        self._incomplete = 0  # samples of the split the reader leaves out (no image or no label)
        self._epoch = 0
        self._pipe: Any = None
        self._augment_gen: torch.Generator | None = None  # the epoch's crops and flips on the CPU
        self._iterator: Any = None
        self._fresh = False  # the current pipeline is at the start of an epoch
        self._built_for = 0  # the epoch the current pipeline was built for
        self._stages = StageTimes()  # what stage_times() reports (module docstring)
        # The shards on local disk: in place, or copied whole into the cache (or a temporary directory,
        # removed by close() -- and here, if anything below fails or is interrupted).
        self._files: LocalFiles | None = LocalFiles(
            self.root, cfg.cache_dir, prefix="feedrate-dali-", verify=self.options.verify
        )
        try:
            self._setup(refs, total, device_id)
        except BaseException:
            self.close()
            raise

    def _setup(self, refs: list[ShardRef], total: int, device_id: int | None) -> None:
        """Copy the shards when they are remote, and build the first pipeline."""
        cfg, files = self.cfg, self._files
        assert files is not None
        t0 = time.perf_counter()
        listed = [(r.name, r.bytes, r.sha256) for r in refs] + [
            (r.index_name, r.index_bytes, r.index_sha256) for r in refs
        ]
        paths = files.paths(listed, self.options.net or None)
        self.prefetch_plan: dict[str, object] = files.plan
        self._spec = self._ops.GraphSpec(
            paths=tuple(str(p) for p in paths[: len(refs)]),
            index_paths=tuple(str(p) for p in paths[len(refs) :]),
            encoding=self.root.manifest.encoding,
            train=cfg.train,
            batch_size=cfg.batch_size,
            threads=self.options.threads,
            prefetch=self.options.prefetch,
            initial_fill=self.options.initial_fill,
            seed=0,  # set per pipeline by _build
            order_seed=0,
            shard_id=cfg.rank,
            num_shards=cfg.world_size,
            device_id=device_id,
            hw_decoder_load=float(self.options.hw_decoder_load),
            skip_incomplete=self.options.skip_bad,
            augment=device_id is not None,  # on the CPU the batch is augmented here (module docstring)
        )
        self._build()
        if self.options.skip_bad:
            readable = int(self._pipe.reader_meta(self._ops.READER_NAME)["epoch_size"])
            self._incomplete = total - readable
            self.samples = rank_samples(readable, cfg.rank, cfg.world_size)
            if self.samples < 1:
                raise FeedrateError(f"rank {cfg.rank} of {cfg.world_size} gets no samples: all were skipped")
        if files.started is not None:
            duration = time.perf_counter() - t0
            self.downloads.append(
                Download(cfg.split, files.started, files.loading, duration, sum(r.samples for r in refs))
            )

    # -- setup ----------------------------------------------------------------------------------------
    def _device_id(self) -> int | None:
        if self.device.type == "cpu":
            return None
        if self.device.type != "cuda":
            raise FeedrateError(f"the dali loader runs on cpu or cuda, not {self.cfg.device!r}")
        if not torch.cuda.is_available():
            raise FeedrateError(f"device {self.cfg.device!r} was asked for but torch sees no CUDA GPU")
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def _build(self) -> None:
        """A fresh pipeline at the start of epoch `self._epoch` (the old one, if any, is released)."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self._iterator = self._pipe = None
        spec = dataclasses.replace(
            self._spec,
            # augmentation per rank; the tar order shared by every rank (see the module docstring)
            seed=epoch_seed(self.cfg.seed, self._epoch, self.cfg.rank, stream=AUGMENT, bits=31),
            order_seed=epoch_seed(self.cfg.seed, self._epoch, stream=ORDER, bits=31),
        )
        self._built_for = self._epoch
        try:
            with self._dali_span():  # the build reads the shards ahead: storage, merged into decode
                self._pipe = self._ops.build_pipeline(spec)
        except RuntimeError as exc:
            raise DaliError(
                f"DALI cannot read the {self.cfg.split} shards of {self.root.url}: {_reason(exc)}"
                + self._culprit()
            ) from None
        # PARTIAL: the last batch keeps only real samples (the reader's padding is cut off here)
        self._iterator = DALIGenericIterator(
            self._pipe,
            list(self._ops.OUTPUT_NAMES),
            reader_name=self._ops.READER_NAME,
            last_batch_policy=LastBatchPolicy.PARTIAL,
            auto_reset=True,
            prepare_first_batch=False,
        )
        self._fresh = True

    # -- the loader protocol --------------------------------------------------------------------------
    def __len__(self) -> int:
        return batches_for(self.samples, self.cfg.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self._fresh or (self.cfg.train and self.cfg.world_size > 1 and self._built_for != self._epoch):
            # the last epoch was abandoned part-way (DALI cannot rewind), or several ranks must start
            # this epoch from one order (see the module docstring)
            self._build()
        self._fresh = False
        self._augment_gen = None
        if self.cfg.train and not self._spec.augment:
            self._augment_gen = torch.Generator()
            self._augment_gen.manual_seed(
                epoch_seed(self.cfg.seed, self._epoch, self.cfg.rank, stream=AUGMENT)
            )
        if self._incomplete and self._skips is not None and self.cfg.rank == 0:
            self._skips.skip(self.root.url, [], "it lacks its image or its label", self._incomplete)
        left = self.samples
        while left > 0:
            out = self._next()
            if out is None:
                raise DaliError(f"DALI ended the epoch {left} samples early (expected {self.samples})")
            images, labels, read = out
            left -= read
            if left == 0:
                self._finish_epoch()  # before the last yield: a caller may stop right after it
            if labels.shape[0]:
                yield images, labels

    def _advance(self) -> dict[str, torch.Tensor] | None:
        """DALI's next batch as a dict of torch tensors, or None at the end of the epoch."""
        try:
            with self._dali_span():
                return next(self._iterator)[0]
        except StopIteration:
            return None
        except RuntimeError as exc:
            self._fresh = False  # a failed pipeline is not reused
            raise DaliError(
                f"DALI failed on the {self.cfg.split} shards of {self.root.url}: {_reason(exc)}"
                + self._culprit()
            ) from None

    def _next(self) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """The next non-empty batch of this epoch and the samples DALI read for it (more than the batch
        holds when bad labels were skipped), or None at the epoch's end."""
        while (out := self._advance()) is not None:
            images = out["images"]
            if images.shape[0] == 0:
                continue  # only padding: a shorter rank's extra batch
            read = images.shape[0]
            # On the CPU the label parsing counts under augment; on a GPU augment is DALI's (docstring)
            # every stage here is in the consumer's thread: the step waits for it (loaders.stagetimes)
            on_cpu = not self._spec.augment
            with self._stages.timed("augment", consumer=True) if on_cpu else contextlib.nullcontext():
                images, values = self._checked_labels(images, out["labels"].numpy())
                if not self._spec.augment:  # the decoded uint8 NHWC batch, on the CPU
                    with one_torch_thread():
                        if self._augment_gen is not None:
                            images = augment(images, self._augment_gen, layout="NHWC")
                        else:
                            images = normalize(images, "NHWC")
            with self._stages.timed("transfer", consumer=True):
                labels = torch.from_numpy(values)
                if self.device.type == "cuda":
                    labels = to_device(labels, self.device)
            return images, labels, read
        return None

    def _checked_labels(self, images: torch.Tensor, padded: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """The batch's images and integer labels, its samples with bad labels dropped (with `skip_bad`;
        else a DaliError naming the dataset and the first bad sample)."""
        values, bad = label_rows(padded, self.num_classes)
        if bad.any():
            reason = _bad_label(padded, values, bad, self.num_classes)
            if self._skips is None:
                raise DaliError(f"{self.root.url}: {reason}" + self._culprit())
            self._skips.skip(self.root.url, [], reason, int(bad.sum()))
            keep = torch.from_numpy(np.flatnonzero(~bad))
            images, values = images[keep.to(images.device)], values[~bad]
        return images, values

    @contextlib.contextmanager
    def _dali_span(self) -> Iterator[None]:
        """Count the block under `decode`: its wall time and the process's CPU time, since the work is
        done by DALI's threads, not the calling one (module docstring)."""
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self._stages.add("decode", time.perf_counter() - wall, time.process_time() - cpu, consumer=True)

    def stage_times(self) -> Snapshot:
        """Cumulative seconds per stage since the loader was built (loaders.stagetimes; which stages and
        what each holds: the module docstring)."""
        return self._stages.snapshot()

    def _culprit(self) -> str:
        """`; the first bad sample: SHARD: sample KEY: why`, or "" when none is found (see the module
        docstring). Only called when DALI has already failed: it reads and decodes every shard."""
        for tar, idx in zip(self._spec.paths, self._spec.index_paths, strict=True):
            found = first_bad_sample(Path(tar), Path(idx), self.root.manifest.encoding, self.num_classes)
            if found is not None:
                return f"; the first bad sample: {found}"
        return ""

    def _finish_epoch(self) -> None:
        """Run the reader to its epoch end (padding only is left), so the next epoch starts clean."""
        while (out := self._advance()) is not None:
            if out["images"].shape[0]:
                raise DaliError(f"DALI yielded more than the {self.samples} samples of this epoch")
        self._fresh = True
        self._epoch += 1

    def set_epoch(self, epoch: int) -> None:
        """Seed the next pipeline built with (seed, epoch). A pipeline that finished its last epoch goes
        on: its reader reshuffles every epoch by itself, deterministically from the seeds it was built
        with."""
        self._epoch = epoch

    def stats(self) -> dict[str, int]:
        return self._files.stats(self._skips.count if self._skips else 0).as_dict()

    def close(self) -> None:
        """Release the pipeline and remove a temporary copy of the shards (a cache directory stays)."""
        self._iterator = self._pipe = None
        self._fresh = False
        if self._files is not None:
            self._files.close()

    def __enter__(self) -> DaliLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
