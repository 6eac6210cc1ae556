"""The `dali` loader: NVIDIA DALI reads and decodes (on a GPU, augments too); batches arrive as torch
tensors on the device.

On a GPU, jpg is decoded by nvJPEG (`decoders.image` on device "mixed"), and crop, flip and
normalisation run on the GPU; DALI's buffers become torch tensors through DLPack, without a trip through
host memory. Without a GPU, or with `device="cpu"`, DALI's CPU operators (`device_id=None`) read and
decode, and the batch is cropped, flipped and normalised here by batched torch ops, each sample's crop
and flip looked up by its id from the epoch's table (loaders.augment.EpochDraws: a function of (seed,
epoch, sample) alone): DALI's per-sample CPU operators cost five times as much at 32x32 (see
loaders.dali_ops). Those ops run on one torch thread: the cores are DALI's (`threads`), and torch's
own intra-op threads spinning against DALI's cost up to ten times the work (measured on 2 cores with
torch's default 2 threads: 47-247 against 18-22 CPU us per image; where torch has one thread already,
as train.py sets it with 2 workers on 2 cores, nothing changes).

The graph itself is in loaders.dali_ops; which sample is which, the rest of an epoch and DALI's
checkpoints in loaders.dali_state; this module finds the shards, owns the pipeline's lifetime and
epoch bookkeeping, and turns DALI's output dicts into `(images, labels)`.

Shards are always read from local disk by DALI's webdataset reader, with shardgen's index files:
- a local dataset: the files in place;
- `s3://` / `cos://`: every shard and index file of the split is first copied whole by
  `loaders.localcopy.LocalFiles` into the dataset's directory of the cache (`cache_dir`, shared with
  every loader reading the same dataset; else a temporary one that `close()` removes), one GET per file,
  verified against the manifest's sha256. The fetch is recorded as a `Download` (CSV type 10 / 11).
  DALI's own `s3://` reading was not used: it issues about three ranged
  GETs per sample (168 img/s against a local endpoint).

Epochs are exact: every sample of this rank's part exactly once, the last batch partial, `len()` the
same every epoch (see loaders.dali_ops for the reader settings that make this so). Every epoch (training
or evaluation) reads a pipeline built for it, seeded explicitly: the tar order by (seed, epoch), the
same on every rank, whose parts are contiguous ranges of it; the reader's shuffle buffer by (seed,
epoch, rank); the GPU's in-graph augmentation by (seed, epoch, rank). So an epoch's batches are a
function of (seed, epoch, rank, world size) and the options (batch size, initial_fill, the files), not
of what was read before -- which is what lets a checkpoint continue it. A pipeline that went on by
itself would order the next epoch from its own history; and under torchrun the ranks do not all
finish their epochs (train.py stops every rank at the shortest rank's batch count). What a build costs,
measured on the 2-core machine: for 20,000 raw samples 25-40 ms of CPU (read_ahead reading the tars
into the page cache ~13 ms of it), then 40-70 ms to the first batch, most of which is the shuffle
buffer's fill (initial_fill samples read up front that the epoch would read anyway); whole epochs A/B
against a pipeline that goes on (medians of 12 alternating epochs, batch 256, 2 threads): +60 ms CPU an
epoch, ~3 us per image at that size. For CIFAR-10's 50,000: 70-115 ms wall to build, 140-250 ms to the
first batch (a busy host), about 1-2 us per image of a 2.5 s epoch. The first pipeline is built when
the loader is made (bad data is found then).

The next epoch's pipeline is built ahead (`_Ahead`). Once an epoch has as many samples left as the
next pipeline's reader reads before its first batch (training: the shuffle buffer's `initial_fill`
plus `prefetch` batches; evaluation: the `prefetch` batches), a thread builds the pipeline of the
epoch after it -- the whole epoch, seeded by (seed, epoch + 1), as it would be built in place -- and
schedules its first runs, so that its reader fills on DALI's threads while this epoch ends. The next
iteration takes it when it is that epoch's whole pipeline (`set_epoch(epoch + 1)`, no loaded state
pending); anything else (another epoch, the same one again, `load_state_dict`, `close()`) joins the
thread and releases its pipeline, and the right one is built in place. An error of that build is
raised by the next iteration, as the build in place would have raised it. A checkpoint of a pipeline
built ahead is DALI's as any other (its first runs were scheduled early, nothing else differs).
Nothing is built past the last epoch when the caller says which it is (`LoaderConfig.last_epoch`,
train.py's `--epochs`): that build, 100-150 ms of CPU plus its reader's fill, would serve no one.
Measured on the 2-core machine, shared with other work: 20,000 samples, batch 256, 2 threads, whole
epochs A/B against building in place (alternating, medians): raw (6 rounds of 6 epochs) the first
batch 156 -> 8.5 ms, 40.6k -> 46.1k img/s, CPU per image within noise (34.4 and 35.0 us); jpg (3 of 5)
198 -> 8.5 ms, 19.2k -> 21.1k img/s, 89.5 and 85.1 us. The cost is two pipelines while an epoch ends:
the peak RSS of a process reading 6 raw epochs 788-797 -> 874-904 MiB (3 processes each; 16 epochs:
823 -> 912 MiB, the anonymous memory ~55 MiB higher from the third epoch on and flat after it, not
growing). DALI's `Pipeline.build` holds the GIL throughout (~30 ms here: a Python thread beside it
stalls as long), so the build is not hidden from a consumer running Python; the fill is. At CIFAR-10's
50,000 raw samples (4 epochs, batch 256, 2 threads; 3 alternating processes each, the peak of /proc's
VmRSS, ru_maxrss the same) the peak RSS is 942-952 MiB in place and 1048-1066 MiB built ahead, all of
the difference anonymous (425-435 -> 531-549 MiB; the file-backed part, libraries and the mapped tars,
517 MiB in both): about what it is at 20,000, not in proportion to the dataset. Such a process is
above DESIGN's ~0.9 GB without the build ahead too. Starting the build only as the last batch is
handed out, the ended pipeline released first (`_ahead_at = 0`: never two), kept 958-988 MiB but
gives the fill no time: the first batch of an epoch 156-222 ms (median 164) against 13-60 (54) built
early, 34.9k-43.2k img/s against 29.9k-51.5k (3 rounds each, a busy shared machine; an earlier run:
raw 57.8k img/s and 53 ms against 70.8k and 20 ms starting early and 62.6k and 93 ms in place), so
it is not the default. After the last epoch a loader has built and filled a pipeline that nothing
reads, held until close(): at 50,000 raw samples 100-150 ms of the build thread's CPU (113-322 ms
wall), its reader's fill on DALI's threads besides, and the ~100 MiB above.

A pipeline runs no further than its epoch: DALI's iterator schedules a run for every batch it hands
out, so past the end its reader went on into a second epoch (`prefetch` batches, and the shuffle
buffer refilled for them) that nobody reads, and a reset at the end would start it too (auto_reset is
off). That is no great cost by itself (whole raw epochs with and without those runs, the build
included, 6 rounds of 6 alternating: 35.5 and 34.4 CPU us per image, inside their 30-40 spread on the
shared machine), but it would compete with the fill of the pipeline built ahead. A pipeline read to
its end is released then, when one built ahead is to take over: an evaluation loader keeps one
pipeline, not two, through the training epoch between its epochs. The build thread releases it, or
a short thread of its own once the build thread has ended (`_Ahead.retire`: the loader hands it over
and keeps no reference; no thread ever waits for one, so a loader dropped without close() leaves no
thread behind -- the full test suite ran out of memory when one did), since DALI joins the pipeline's
threads as it goes: 28-64 ms wall and 14-21 ms CPU each (20,000 raw samples, 5 epochs, the shared
machine) that were the consumer's before the epoch's last batch, in no stage; on the build thread
17-30 ms wall and 16-26 ms CPU (50,000: 20-31 and 18-28), counted under decode with the build.

Checkpoints (`state_dict()` / `load_state_dict()`, the contract of loaders.resume):
- ids: every batch's sample ids come from its label rows (loaders.dali_state: the label component
  widened over its tar header, which names the sample), marked consumed as the batch is handed out;
- the same worker and rank counts (and the same options and DALI version, `exact["spec"]`): `exact`
  holds DALI's own checkpoint of this rank's pipeline (its reader's position and, on a GPU, its random
  operators' state; a few hundred bytes, base64) and the samples this rank read and yielded; the
  resumed epoch builds the same pipeline from it and continues with exactly the batches the
  uninterrupted run would have yielded, augmentation included. DALI fast-forwards its reader by
  counting, not reading: it reads only what was still in the shuffle buffer (resume to first batch:
  see tests/test_dali_state.py's measurements). The checkpoint is walked and held to the validated
  counts before DALI parses it (loaders.dali_state): the reader's and iterator's counters, the
  pipeline's epoch, the per-shard counters and sizes; the iterator's epoch length is compared with the
  one DALI computes as it builds the pipeline. The bitmap is held to the position too: each rank sums a
  digest of the ids it hands out (`exact["ids"]`, loaders.dali_state.id_digest), and the consumed set
  beyond `basis` must have the ranks' summed digest -- as many samples is not enough, they must be the
  ones the positions handed out. (DALI's order cannot be computed without running its reader, so the
  ids are not derived from the position itself, as the wds loader does; the digest binds them to it.)
  An iteration that gets more samples from DALI than the part has left is a DaliError;
- other counts (elastic), or `exact` unusable (another option, another DALI): the remainder -- the
  split minus the consumed bitmap -- is written as index files listing only its samples (shards with
  none left are left out; a temporary directory the loader removes), and DALI deals it to the ranks as
  any epoch (contiguous parts of its tar order, differing by at most one sample); `samples` and `len()`
  describe this rank's part. No sample is re-read or decoded to get there;
- a resumed epoch whose pipeline was itself a remainder keeps that remainder's basis (the bitmap it
  left out) in `exact["basis"]`, so the same counts can continue it exactly again;
- skip_bad: samples that lack their image or label are never read (left out of every index), neither
  yielded nor consumed, and not counted as missing in a remainder; a bad label is read and dropped
  (`read` counts it, the bitmap does not): an elastic remainder holds it again, and it is dropped (and
  counted skipped) again.
On a GPU the same holds (labels, and so ids, stay on the host; the augmentation is DALI's and its
state is in DALI's checkpoint), but only its CPU twin (the in-graph augmentation built without a GPU)
is tested here.

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
  `read_ahead` reads the shards in). A pipeline built ahead counts its thread's wall and CPU seconds
  (`time.thread_time`; releasing the ended pipeline, which that thread does, included) as a
  reader's, off the consumer's path; the consumer's spans that overlap that thread leave its CPU out
  (read through its thread clock, `time.pthread_getcpuclockid`), so it is counted once. Waiting for a
  build that has not finished is the consumer's, and the thread's wall counts only beyond that wait.
  The new pipeline's reader fills on DALI's threads while the ending epoch's last batches are read:
  its CPU lands in those spans of the consumer's (the process's CPU), or in no stage when it runs
  while the consumer augments -- not in the epoch it serves. So decode's CPU per image with the build
  ahead (A/B as in the build-ahead figures above: raw 9.2 -> 7.0 us, jpg 35.4 -> 32.9) fell because
  work moved out of its view, not because it was saved: the process's CPU per image stayed within
  noise. It includes reading the shards:
  storage and decode are merged,
  and `storage` is absent ("not separable"). On a GPU it also holds the augmentation and the images'
  copy to the device, which stay inside DALI there. Its CPU seconds are the process's
  (`time.process_time()`) over the span, so DALI's threads working in it count; DALI's work done ahead
  while the consumer is elsewhere (the step, the CPU augmentation) is in neither figure: they are what
  the consumer waits for, a lower bound of DALI's own busy time, and one reader's seconds (the wait on
  all of DALI's threads at once), not a sum over them. Two dali loaders in one process (train.py's
  training and evaluation loaders) overlap: a span leaves out only its own loader's build thread, so
  DALI's threads working for the other loader count in it too -- the training loader's next pipeline
  filling while the evaluation epoch runs lands in the evaluation loader's decode CPU, and the
  reverse. DALI does not say which native threads are whose pipeline's, so there is no cheap exact
  split; their decode CPU seconds are an upper bound each, not to be summed.
- `augment` (the CPU path only): the sample ids and label parsing (`SampleTable.ids`, `label_rows`,
  batching work) and the torch crop, flip and normalisation, on the consumer's thread
  (`time.thread_time()`). On a GPU it is absent: merged into `decode`, and the ids and label parsing
  are then not counted.
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
`stats()["skipped"]`, with a line on stderr: samples that lack their image or label (left out of the
index files DALI reads: they leave the epoch, counted once per epoch, on rank 0) and labels that are not
class numbers (dropped from their batch on the host). An image that does not decode stays
an error: DALI's decoders have no per-sample error policy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import importlib
import itertools
import json
import os
import queue
import re
import shutil
import stat
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from feedrate.errors import FeedrateError
from loaders.augment import EpochDraws, normalize
from loaders.base import Download, LoaderConfig, batches_for, last_epoch
from loaders.dali_state import (
    SampleTable,
    checkpoint_position,
    decode_checkpoint,
    encode_checkpoint,
    id_digest,
    rank_part,
    shard_sizes,
)
from loaders.decode import MAX_LABEL_DIGITS
from loaders.localcopy import LocalFiles
from loaders.options import count, flag, fraction, net_preset, parse_options
from loaders.resume import Progress, check, decode, encode, exact_for, same_counts
from loaders.seeds import AUGMENT, ORDER, epoch_seed
from loaders.shards import DatasetRoot, ShardRef, dataset_key, first_bad_sample, open_dataset
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


@functools.cache
def _checked_iterator() -> type:
    """DALIGenericIterator that holds what it restores from a checkpoint to what it computed itself
    for its pipeline: the per-shard counters and sizes, the shard ids and the epoch length (the count
    of samples is the loader's to check, loaders.dali_state). A difference is a ValueError (the build
    then fails with a one-line FeedrateError); `restored` says the check ran. It schedules no run past
    the epoch's end, and `start()` schedules the first runs before the first `next` (module
    docstring)."""
    from nvidia.dali import types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    class CheckedIterator(DALIGenericIterator):  # type: ignore[misc,valid-type]
        restored = False
        _runs_left: int | None = None  # runs of this epoch not yet scheduled (None: none scheduled)

        def start(self) -> None:
            """Schedule the first runs now (the prefetch queue fills on DALI's threads), as the first
            `next` would: that `next` then only waits for what is not ready yet."""
            self._schedule_runs(False)

        def _schedule_runs(self, release_outputs: bool = True) -> None:
            # DALI's own schedules a run for every batch handed out, also past the epoch's end: its
            # pipeline then reads `prefetch` batches of a second epoch (and refills the shuffle buffer
            # for it) that the loader never asks for, beside the fill of the next one (module docstring)
            self._ever_scheduled = True
            (pipe,) = self._pipes
            with pipe._check_api_type_scope(types.PipelineAPIType.ITERATOR):
                if release_outputs:
                    pipe.release_outputs()
                if self._runs_left is None:  # the first call fills the prefetch queue
                    self._runs_left = -(-(self._size - self._counter) // self.batch_size)
                    pipe.schedule_run()
                    self._runs_left -= pipe.prefetch_queue_depth
                elif self._runs_left > 0:
                    pipe.schedule_run()
                    self._runs_left -= 1

        def _restore_state(self, iterator_data: str) -> None:
            fields = [f for f, _ in self._checkpointed_fields() if f != "_counter" and hasattr(self, f)]
            fresh = {f: np.array(getattr(self, f)).tolist() for f in fields}
            super()._restore_state(iterator_data)
            for name, want in fresh.items():
                got = np.array(getattr(self, name)).tolist()
                if got != want:
                    raise ValueError(
                        f"exact.dali's iterator {name.strip('_')} is {_short(got)}; DALI's own is {want}"
                    )
            self.restored = True

    return CheckedIterator


def _short(value: object, limit: int = 120) -> str:
    """repr(value), cut to `limit` characters (an error message names a crafted value, not all of it)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _reason(exc: BaseException) -> str:
    """What a DALI error says went wrong, without the traceback of the graph it wraps it in."""
    text = str(exc)
    operator = re.search(r"operator `(?:nvidia\.dali\.)?([^`]+)`", text)
    cause = text.split("encountered:", 1)[1] if "encountered:" in text else text
    lines = [ln.strip() for ln in cause.splitlines() if ln.strip() and "no longer valid" not in ln]
    reason = " ".join(lines[:3]) or type(exc).__name__
    return f"{operator.group(1)}: {reason}" if operator else reason


INDEX_DIR_PREFIX = "feedrate-dali-idx-"  # then the owning process's id, "-", a random part
INDEX_LOCK = ".lock"  # in an index directory: flock-ed by its owner for as long as the loader lives
UNLOCKED_GRACE_S = 60.0  # an index directory without a lock file is this old before it is swept


def _own_index_dir() -> tuple[Path, int]:
    """A new index directory and the descriptor of its lock file, flock-ed (exclusively) by this process:
    the lock, not the process id, tells a sweeping loader that the directory is in use (a process in
    another PID namespace sharing /tmp looks dead by its id). The lock goes when the descriptor is
    closed or the process dies, however it dies. The directory is made under a hidden name (which no
    sweep looks at), locked, then renamed: a sweep never sees it unlocked."""
    hidden = Path(tempfile.mkdtemp(prefix=f".{INDEX_DIR_PREFIX}{os.getpid()}-"))
    try:
        fd = os.open(hidden / INDEX_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except BaseException:
        shutil.rmtree(hidden, ignore_errors=True)
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a directory just made: nobody else holds it
        path = hidden.with_name(hidden.name[1:])
        os.rename(hidden, path)  # the lock is the file's: it moves with it
    except BaseException:
        _release_index_dir(hidden, fd)
        raise
    return path, fd


def _release_index_dir(path: Path, fd: int) -> None:
    """Remove an index directory this process owns, then let go of its lock."""
    try:
        shutil.rmtree(path, ignore_errors=True)
    finally:
        os.close(fd)


def _sweep_index_dirs() -> None:
    """Remove the index directories of dali loaders that are gone (killed: no finalizer ran).

    Only this user's directories (st_uid, not following links). One whose lock file (INDEX_LOCK) some
    process holds is in use and stays; one whose lock this sweep takes is removed while it holds it. A
    directory without a lock file is one being made (its owner has not locked it yet) or an older
    feedrate's: removed only when it is over UNLOCKED_GRACE_S old and no process of its id runs here.
    """
    uid, now = os.getuid(), time.time()
    for path in Path(tempfile.gettempdir()).glob(f"{INDEX_DIR_PREFIX}*-*"):
        try:
            info = path.lstat()
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid:
            continue
        try:
            fd = os.open(path / INDEX_LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            if now - info.st_mtime > UNLOCKED_GRACE_S and not _process_runs(path):
                shutil.rmtree(path, ignore_errors=True)
            continue
        except OSError:
            continue  # a link, or unreadable: not ours to judge
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # held: a live loader's
            continue
        _release_index_dir(path, fd)


def _process_runs(path: Path) -> bool:
    """Whether the process named in an index directory's name may still run (True when unsure)."""
    pid = path.name[len(INDEX_DIR_PREFIX) :].split("-", 1)[0]
    if not pid.isdigit() or int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        pass  # another user's live process (or no such pid at all on this system)
    return True


_SERIALS = itertools.count()  # _Plan.serial: which plan a built pipeline is for


@dataclass
class _Plan:
    """What one epoch's pipeline serves this rank, and how far it has got (module docstring).

    `basis`: the ids the pipeline's index files leave out (None: the whole split); `readable`: the
    samples DALI's reader deals to the ranks; `part`, `shard_id`, `num_shards`: this rank's part
    (loaders.dali_state.rank_part); `offset`/`yielded`: samples read/yielded before the pipeline starts
    (restored from a checkpoint), `checkpoint`: DALI's, to build it from; `carried`: the consumed bitmap
    the epoch starts from. `read`/`handed` count on from offset/yielded while it is iterated, `summed`
    from `digest` (loaders.dali_state.id_digest of the ids handed out). `serial`: a number of its own,
    new for every plan made (also by `dataclasses.replace`), naming the plan a pipeline was built for."""

    epoch: int
    basis: np.ndarray | None
    keep: np.ndarray | None  # the ids the index files list (None: the whole split's files)
    readable: int
    part: int
    shard_id: int
    num_shards: int
    offset: int = 0
    yielded: int = 0
    checkpoint: bytes | None = None
    carried: np.ndarray | None = None
    digest: int = 0
    read: int = 0
    handed: int = 0
    summed: int = 0
    serial: int = field(init=False, default_factory=lambda: next(_SERIALS))

    def restart(self) -> _Plan:
        """This plan at its start, for an iteration."""
        return dataclasses.replace(self, read=self.offset, handed=self.yielded, summed=self.digest)


EXACT_KEYS = ("spec", "read", "yielded", "ids", "dali", "basis")


class _Ahead:
    """The next epoch's pipeline, built and started in a thread of its own while this epoch ends; the
    ended epoch's pipeline is released off the consumer's thread too.

    `make(plan)` returns (pipeline, iterator) or raises; its error is kept for the consumer to raise
    (DaliLoader._take_ahead). `retire(box)` hands the thread a list holding the ended pipeline and its
    iterator: the thread empties it, so the last references drop there (when the caller keeps no other
    reference to them), not on the consumer's path -- the release costs 17-64 ms wall and 14-26 ms CPU
    (20,000 raw samples, 5 epochs, the shared 2-core machine), as DALI joins the pipeline's threads. A
    box given at construction is emptied before the build (the ended pipeline let go before the next
    one reads ahead); one handed over while the thread still runs is emptied by it after the build, and
    one handed over later by a short thread of its own (whose CPU, 14-26 ms, `cpu()` does not count).
    `wall` is the build's and the releases' seconds. `cpu()` is the build thread's own CPU seconds so
    far, read through its thread clock, so that a span of the consumer's overlapping it can leave them
    out (DaliLoader._dali_span). A daemon, that never waits for a box: an unclosed loader neither holds
    up the interpreter's exit nor keeps a thread (and through it the loader and its pipelines) alive."""

    def __init__(
        self, plan: _Plan, make: Callable[[_Plan], tuple[Any, Any]], retire: list[Any] | None = None
    ) -> None:
        self.plan = plan
        self._boxes: queue.SimpleQueue[list[Any]] = queue.SimpleQueue()
        self._releases: list[threading.Thread] = []  # boxes handed over once the build thread ended
        if retire is not None:
            self._boxes.put(retire)
        self.pipe: Any = None
        self.iterator: Any = None
        self.error: Exception | None = None
        self.wall = 0.0
        self._lock = threading.Lock()
        self._clock: int | None = None
        self._cpu = 0.0
        self._done = False
        self._thread = threading.Thread(
            target=self._run, args=(make,), name=f"feedrate-dali-ahead-{plan.epoch}", daemon=True
        )
        self._thread.start()

    def _run(self, make: Callable[[_Plan], tuple[Any, Any]]) -> None:
        with self._lock:
            self._clock = time.pthread_getcpuclockid(threading.get_ident())
        try:
            if (box := self._next_box(last=False)) is not None:  # given at construction: before the build
                self._empty(box)
            start = time.perf_counter()
            try:
                self.pipe, self.iterator = make(self.plan)
            except Exception as exc:  # raised again by the consumer (take)
                self.error = exc
            finally:
                self.wall += time.perf_counter() - start
            while (box := self._next_box(last=True)) is not None:  # handed over during the build
                self._empty(box)
        finally:
            self._finish()

    def _next_box(self, last: bool) -> list[Any] | None:
        """A box waiting to be emptied, else None; `last`: none is waiting, so the thread ends now (in
        the same step, under the lock: a box handed over later goes to a thread of its own)."""
        with self._lock:
            try:
                return self._boxes.get_nowait()
            except queue.Empty:
                if last:
                    self._finish_locked()
                return None

    def _finish(self) -> None:
        with self._lock:
            if not self._done:
                self._finish_locked()

    def _finish_locked(self) -> None:
        self._cpu = time.thread_time()  # the thread's clock is read under the lock only while it runs
        self._done = True

    def _empty(self, box: list[Any]) -> None:
        start = time.perf_counter()
        box.clear()  # the last references: the pipeline is destroyed here
        self.wall += time.perf_counter() - start

    def retire(self, box: list[Any]) -> None:
        """Have `box` (the ended pipeline and its iterator) emptied off the caller's thread: by the build
        thread if it is still running, else by a short thread of its own (the build thread never waits
        for a box: a loader dropped without close() leaves no thread behind)."""
        with self._lock:
            if not self._done:
                self._boxes.put(box)
                return
        release = threading.Thread(target=self._empty, args=(box,), name=self._thread.name, daemon=True)
        self._releases.append(release)
        release.start()

    def cpu(self) -> float:
        """The build thread's CPU seconds so far (all of them once it is done)."""
        with self._lock:
            if self._done or self._clock is None:
                return self._cpu
            return time.clock_gettime(self._clock)

    def join(self) -> None:
        """Wait for the build and the releases handed over so far."""
        self._thread.join()
        for release in self._releases:
            release.join()

    def release(self) -> None:
        """Wait for the thread to end and let go of its pipeline."""
        self.join()
        self.pipe = self.iterator = None


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
        self.total = sum(ref.samples for ref in refs)
        if rank_part(self.total, cfg.rank, cfg.world_size)[0] < 1:
            raise FeedrateError(
                f"rank {cfg.rank} of {cfg.world_size} gets no samples: the {cfg.split} split has {self.total}"
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
        self._progress = Progress(self.total, dataset_key(self.root))
        self._resume: _Plan | None = None  # a loaded state's plan, until its epoch is read to the end
        self._whole: _Plan | None = None  # the current epoch's plan when no state is pending for it
        self._active: _Plan | None = None  # the iteration under way (or last) in the current epoch
        self._pipe: Any = None
        self._iterator: Any = None
        self._built: int | None = None  # the serial of the plan the pipeline was built for
        self._fresh = False  # the current pipeline is at the start of its epoch
        self._ahead: _Ahead | None = None  # the next epoch's pipeline, being built (module docstring)
        # the samples left in an epoch when the next one's pipeline is built: what its reader reads
        # before its first batch (module docstring); None: never (the tests' reference)
        self._ahead_at: int | None = self.options.prefetch * cfg.batch_size
        if cfg.train:
            self._ahead_at += self.options.initial_fill
        self._closed = False
        self._stages = StageTimes()  # what stage_times() reports (module docstring)
        # The shards on local disk: in place, or copied whole into the cache (or a temporary directory,
        # removed by close() -- and here, if anything below fails or is interrupted).
        self._files: LocalFiles | None = LocalFiles(
            self.root, cfg.cache_dir, prefix="feedrate-dali-", verify=self.options.verify
        )
        # DALI's index files (loaders.dali_state); removed by close(), else when the loader is collected
        # or the interpreter exits; a killed process leaves them (a few MB for CIFAR-10), so the next
        # loader removes those of processes that are gone
        _sweep_index_dirs()
        self._index_dir, lock = _own_index_dir()
        self._cleanup = weakref.finalize(self, _release_index_dir, self._index_dir, lock)
        try:
            self._setup(refs, device_id)
        except BaseException:
            self.close()
            raise

    def _setup(self, refs: list[ShardRef], device_id: int | None) -> None:
        """Copy the shards when they are remote, index the samples, and build the first pipeline."""
        cfg, files = self.cfg, self._files
        assert files is not None
        t0 = time.perf_counter()
        listed = [(r.name, r.bytes, r.sha256) for r in refs] + [
            (r.index_name, r.index_bytes, r.index_sha256) for r in refs
        ]
        paths = files.paths(listed, self.options.net or None)
        self.prefetch_plan: dict[str, object] = files.plan
        self._tars = tuple(str(p) for p in paths[: len(refs)])
        self._indexes = tuple(str(p) for p in paths[len(refs) :])  # shardgen's, for _culprit
        encoding = self.root.manifest.encoding
        self._table = SampleTable.build(
            self._tars,
            [Path(p).read_text(encoding="ascii", errors="replace") for p in self._indexes],
            [r.samples for r in refs],
            encoding,
        )
        # with skip_bad the samples DALI cannot read whole are left out of every index file; without,
        # DALI is shown them and fails (and _culprit names the first)
        self._readable = self._table.complete if self.options.skip_bad else None
        tars, indexes, readable = self._table.index_files(self._index_dir / "split", self._readable)
        self._incomplete = self.total - readable
        if rank_part(readable, cfg.rank, cfg.world_size)[0] < 1:
            raise FeedrateError(f"rank {cfg.rank} of {cfg.world_size} gets no samples: all were skipped")
        self._spec = self._ops.GraphSpec(
            paths=tuple(tars),
            index_paths=tuple(indexes),
            encoding=encoding,
            train=cfg.train,
            batch_size=cfg.batch_size,
            threads=self.options.threads,
            prefetch=self.options.prefetch,
            initial_fill=self.options.initial_fill,
            seed=0,  # the seeds are set per pipeline by _build
            order_seed=0,
            reader_seed=0,
            shard_id=cfg.rank,
            num_shards=cfg.world_size,
            device_id=device_id,
            hw_decoder_load=float(self.options.hw_decoder_load),
            skip_incomplete=self.options.skip_bad,
            augment=device_id is not None,  # on the CPU the batch is augmented here (module docstring)
        )
        self._whole_readable = readable
        self._build(self._pending())
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

    def _plan(self, epoch: int, basis: np.ndarray | None, **restored: Any) -> _Plan:
        """The plan of epoch `epoch` for the split without `basis` (None: the whole split)."""
        if basis is None:
            keep, readable = None, self._whole_readable
        else:
            keep = ~basis if self._readable is None else ~basis & self._readable
            readable = int(keep.sum())
        part, shard_id, num_shards = rank_part(readable, self.cfg.rank, self.cfg.world_size)
        return _Plan(epoch, basis, keep, readable, part, shard_id, num_shards, **restored)

    def _pending(self) -> _Plan:
        """The plan the next iteration serves: a loaded state's for its epoch, else the whole epoch."""
        if self._resume is not None and self._resume.epoch == self._epoch:
            return self._resume
        if self._whole is None or self._whole.epoch != self._epoch:
            self._whole = self._plan(self._epoch, None)
        return self._whole

    def _build(self, plan: _Plan) -> None:
        """A fresh pipeline at the start of `plan` (the old one, if any, is released)."""
        self._release()
        with self._dali_span():  # the build reads the shards ahead: storage, merged into decode
            self._pipe, self._iterator = self._make(plan)
        self._built = plan.serial
        self._fresh = True

    def _make(self, plan: _Plan, start: bool = False) -> tuple[Any, Any]:
        """A built pipeline at the start of `plan` and its iterator; `start`: with its first runs
        scheduled (the build ahead). Errors are one-line DaliErrors (a checkpoint DALI refuses: a
        FeedrateError)."""
        from nvidia.dali.plugin.pytorch import LastBatchPolicy

        spec = dataclasses.replace(
            self._spec,
            # the in-graph augmentation and the shuffle buffer per rank; the tar order shared by every
            # rank (module docstring); worker 1 keeps the buffer's seed apart from the tar order's
            seed=epoch_seed(self.cfg.seed, plan.epoch, self.cfg.rank, stream=AUGMENT, bits=31),
            order_seed=epoch_seed(self.cfg.seed, plan.epoch, stream=ORDER, bits=31),
            reader_seed=epoch_seed(self.cfg.seed, plan.epoch, self.cfg.rank, 1, stream=ORDER, bits=31),
            shard_id=plan.shard_id,
            num_shards=plan.num_shards,
        )
        rest = None
        if plan.keep is not None:  # the rest of an epoch: index files listing only its samples
            rest = self._index_dir / f"rest-{plan.epoch}"
            tars, indexes, _ = self._table.index_files(rest, plan.keep)
            spec = dataclasses.replace(spec, paths=tuple(tars), index_paths=tuple(indexes))
        try:
            pipe = self._ops.build_pipeline(spec, plan.checkpoint)
            # PARTIAL: the last batch keeps only real samples (the reader's padding is cut off here);
            # no auto_reset: a pipeline serves one epoch, and a reset would start it on a second
            iterator = _checked_iterator()(
                pipe,
                list(self._ops.OUTPUT_NAMES),
                reader_name=self._ops.READER_NAME,
                last_batch_policy=LastBatchPolicy.PARTIAL,
                auto_reset=False,
                prepare_first_batch=False,
            )
            if plan.checkpoint is not None and not iterator.restored:
                raise ValueError("DALI's iterator did not restore its state through the checked path")
            if start:
                iterator.start()
        except (RuntimeError, ValueError) as exc:
            if plan.checkpoint is not None:
                raise FeedrateError(f"loader state: DALI cannot restore exact.dali: {_reason(exc)}") from None
            raise DaliError(
                f"DALI cannot read the {self.cfg.split} shards of {self.root.url}: {_reason(exc)}"
                + self._culprit()
            ) from None
        finally:
            if rest is not None:  # DALI has read the index files when the pipeline is built
                shutil.rmtree(rest, ignore_errors=True)
        return pipe, iterator

    def _release(self) -> None:
        """Let go of the current pipeline."""
        self._iterator = self._pipe = None
        self._fresh = False

    # -- building the next epoch's pipeline ahead (module docstring) ----------------------------------
    def _start_ahead(self, plan: _Plan, ended: bool) -> None:
        """Build the pipeline of the epoch after `plan`'s (whole, seeded by it) in the background, once,
        while `plan` is the iteration under way; `ended`: `plan` is read to its end, and its pipeline
        is handed to the thread to release before it builds."""
        if self._ahead_at is None or self._ahead is not None or self._active is not plan:
            return
        if self._closed or plan.epoch != self._epoch or last_epoch(self.cfg, plan.epoch):
            return
        make = functools.partial(self._make, start=True)
        self._ahead = _Ahead(self._plan(plan.epoch + 1, None), make, self._handed_over() if ended else None)

    def _handed_over(self) -> list[Any]:
        """The current pipeline and its iterator in a box for the build thread to empty (_Ahead.retire),
        the loader holding no other reference to them."""
        box = [self._pipe, self._iterator]
        self._release()
        return box

    def _join_ahead(self) -> _Ahead | None:
        """The build ahead, ended; None when there is none. Its thread's CPU and wall count under
        decode, not the consumer's; the consumer's wait for it does, as its own, and the thread's wall
        only beyond that wait (the wait overlaps it: counted once; module docstring)."""
        ahead = self._ahead
        if ahead is None:
            return None
        start = time.perf_counter()
        with self._dali_span():
            ahead.join()
        waited = time.perf_counter() - start
        self._ahead = None  # not before it is joined: an interrupted wait leaves it to close()
        # the wait was the consumer's and is counted so already; its CPU was left out of that span
        self._stages.add("decode", max(0.0, ahead.wall - waited), ahead.cpu())
        return ahead

    def _take_ahead(self, source: _Plan) -> bool:
        """Install the pipeline built ahead when it is `source`'s pipeline (True: the whole epoch it was
        built for); else discard it (False). Its build's error, if any, is raised here, as the build
        would have raised it."""
        ahead = self._join_ahead()
        if ahead is None:
            return False
        whole = source.keep is None and source.checkpoint is None and source.offset == 0
        if ahead.plan.epoch != source.epoch or not whole:
            ahead.release()
            return False
        self._release()
        if ahead.error is not None:
            raise ahead.error
        self._pipe, self._iterator = ahead.pipe, ahead.iterator
        ahead.release()
        self._built = source.serial
        self._fresh = True
        return True

    def _drop_ahead(self) -> None:
        """Discard a pipeline built ahead, if any (joined, released)."""
        ahead = self._join_ahead()
        if ahead is not None:
            ahead.release()

    # -- the loader protocol --------------------------------------------------------------------------
    @property
    def samples(self) -> int:
        """This rank's samples in the current epoch: of the rest of it while a loaded state is pending
        for it (loaders.resume), else of the whole split."""
        plan = self._pending()
        return plan.part - plan.offset

    def __len__(self) -> int:
        return batches_for(self.samples, self.cfg.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        source = self._pending()
        plan = source.restart()
        self._progress.start(plan.epoch, plan.carried)
        self._active = plan
        left = plan.part - plan.offset
        if left > 0 and not (self._fresh and self._built == source.serial) and not self._take_ahead(source):
            self._build(source)  # DALI cannot rewind: every iteration starts a pipeline of its own
        self._fresh = False
        draws = None
        if self.cfg.train and not self._spec.augment:
            draws = EpochDraws.draw(self.cfg.seed, plan.epoch, self.total)
        if self._incomplete and self._skips is not None and self.cfg.rank == 0:
            self._skips.skip(self.root.url, [], "it lacks its image or its label", self._incomplete)
        if left <= 0:
            self._end_of(source)
            return
        while left > 0:
            out = self._next(draws)
            if out is None:
                raise DaliError(
                    f"DALI ended the epoch {left} samples early (expected {plan.part - plan.offset})"
                )
            images, labels, ids, read = out
            if read > left:  # DALI's padding passed on as samples: never hand it out
                raise DaliError(
                    f"DALI handed over {read} samples with {left} of this rank's part of {plan.part} left"
                )
            left -= read
            plan.read += read
            if left == 0:
                self._finish_epoch(plan)  # before the last yield: a caller may stop right after it
                self._end_of(source)
                if self._ahead is not None:  # read to its end: one built ahead takes over (docstring)
                    self._ahead.retire(self._handed_over())  # released by its thread, off this path
            if self._ahead_at is not None and left <= self._ahead_at:
                self._start_ahead(plan, ended=left == 0)
            if labels.shape[0]:
                self._progress.mark(ids)
                plan.handed += len(ids)
                plan.summed = (plan.summed + id_digest(ids)) % (1 << 64)
                yield images, labels

    def _end_of(self, source: _Plan) -> None:
        """The epoch of `source` was read to its end: a loaded state for it is no longer pending."""
        if self._resume is source:
            self._resume = None

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

    def _next(self, draws: EpochDraws | None) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, int] | None:
        """The next non-empty batch of this epoch, its sample ids and the samples DALI read for it (more
        than the batch holds when bad labels were skipped), or None at the epoch's end."""
        while (out := self._advance()) is not None:
            images = out["images"]
            if images.shape[0] == 0:
                continue  # only padding: a shorter rank's extra batch
            read = images.shape[0]
            # On the CPU the label parsing counts under augment; on a GPU augment is DALI's (docstring)
            # every stage here is in the consumer's thread: the step waits for it (loaders.stagetimes)
            on_cpu = not self._spec.augment
            with self._stages.timed("augment", consumer=True) if on_cpu else contextlib.nullcontext():
                rows = out["labels"].numpy()
                ids = self._table.ids(rows)
                label = self._table.labels(rows, ids, self._ops.LABEL_WIDTH)
                images, values, ids = self._checked_labels(images, label, ids)
                if not self._spec.augment:  # the decoded uint8 NHWC batch, on the CPU
                    with one_torch_thread():
                        if draws is not None:
                            images = draws.augment(images, torch.from_numpy(ids), layout="NHWC")
                        else:
                            images = normalize(images, "NHWC")
            with self._stages.timed("transfer", consumer=True):
                labels = torch.from_numpy(values)
                if self.device.type == "cuda":
                    labels = to_device(labels, self.device)
            return images, labels, ids, read
        return None

    def _checked_labels(
        self, images: torch.Tensor, padded: np.ndarray, ids: np.ndarray
    ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """The batch's images, integer labels and ids, its samples with bad labels dropped (with
        `skip_bad`; else a DaliError naming the dataset and the first bad sample)."""
        values, bad = label_rows(padded, self.num_classes)
        if bad.any():
            reason = _bad_label(padded, values, bad, self.num_classes)
            if self._skips is None:
                raise DaliError(f"{self.root.url}: {reason}" + self._culprit())
            self._skips.skip(self.root.url, [], reason, int(bad.sum()))
            keep = torch.from_numpy(np.flatnonzero(~bad))
            images, values, ids = images[keep.to(images.device)], values[~bad], ids[~bad]
        return images, values, ids

    @contextlib.contextmanager
    def _dali_span(self) -> Iterator[None]:
        """Count the block under `decode`: its wall time and the process's CPU time, since the work is
        done by DALI's threads, not the calling one (module docstring)."""
        ahead = self._ahead  # its build thread's CPU is counted by _join_ahead, not here
        wall, cpu, other = time.perf_counter(), time.process_time(), ahead.cpu() if ahead else 0.0
        try:
            yield
        finally:
            cpu = time.process_time() - cpu - (ahead.cpu() - other if ahead else 0.0)
            self._stages.add("decode", time.perf_counter() - wall, max(cpu, 0.0), consumer=True)

    def stage_times(self) -> Snapshot:
        """Cumulative seconds per stage since the loader was built (loaders.stagetimes; which stages and
        what each holds: the module docstring)."""
        return self._stages.snapshot()

    def _culprit(self) -> str:
        """`; the first bad sample: SHARD: sample KEY: why`, or "" when none is found (see the module
        docstring). Only called when DALI has already failed: it reads and decodes every shard."""
        for tar, idx in zip(self._tars, self._indexes, strict=True):
            found = first_bad_sample(Path(tar), Path(idx), self.root.manifest.encoding, self.num_classes)
            if found is not None:
                return f"; the first bad sample: {found}"
        return ""

    def _finish_epoch(self, plan: _Plan) -> None:
        """Run the reader to its epoch end (padding only is left)."""
        while (out := self._advance()) is not None:
            if out["images"].shape[0]:
                raise DaliError(f"DALI yielded more than the {plan.part} samples of this epoch")

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration reads (its pipeline is seeded by it); another epoch than a loaded
        state's ends that state."""
        if self._resume is not None and self._resume.epoch != epoch:
            self._resume = None
        if self._ahead is not None and self._ahead.plan.epoch != epoch:
            self._drop_ahead()
        self._epoch = epoch
        self._active = None  # the consumed set restarts, and with it the position
        self._progress.start(epoch, self._resume.carried if self._resume is not None else None)

    # -- checkpoints (loaders.resume; module docstring) ------------------------------------------------
    def _fingerprint(self) -> str:
        """What else must match for `exact` to continue a pipeline: DALI's version and the options that
        shape an epoch's batches (not the files' directories: a copy elsewhere is the same data)."""
        import nvidia.dali

        spec = self._spec
        doc = [
            nvidia.dali.__version__,
            spec.encoding,
            spec.train,
            spec.batch_size,
            spec.initial_fill,
            spec.prefetch,
            spec.augment,
            spec.skip_incomplete,
            [Path(p).name for p in self._tars],
        ]
        return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        """Where this rank is in the current epoch (loaders.resume), with `exact`: the fingerprint,
        the samples read and yielded, DALI's checkpoint while the epoch is part-way, and the basis of
        a remainder pipeline (module docstring). Between batches only."""
        plan = self._active if self._active is not None else self._pending().restart()
        dali = None
        if 0 < plan.read < plan.part:
            if plan is self._active and self._iterator is not None and plan.read > plan.offset:
                dali = encode_checkpoint(self._iterator.checkpoints()[0])
            elif plan.checkpoint is not None:
                dali = encode_checkpoint(plan.checkpoint)
        exact = {
            "spec": self._fingerprint(),
            "read": plan.read,
            "yielded": plan.handed,
            "ids": f"{plan.summed:016x}",
            "dali": dali,
            "basis": None if plan.basis is None else encode(plan.basis),
        }
        return self._progress.state(
            "dali", self.cfg.split, self.cfg.seed, self.cfg.workers, self.cfg.world_size, exact
        )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Serve only what `state` has not consumed when its epoch is read: exactly as the uninterrupted
        run would have with the same counts (and a usable `exact`), else the remainder dealt out again
        (module docstring). Everything is validated (a FeedrateError names the bad value); the loader is
        left at the state's epoch."""
        consumed = check(state, "dali", self.cfg.split, self.cfg.seed, self.total, self._progress.dataset)
        self._drop_ahead()  # the state's plan is built when it is read
        epoch = state["epoch"]
        plan = None
        if same_counts(state, self.cfg.workers, self.cfg.world_size):
            plan = self._exact_plan(state, consumed, epoch)
        if plan is None:  # elastic: the rest of the split, dealt out again
            plan = self._plan(epoch, consumed, carried=consumed)
        self._resume = plan
        self.set_epoch(epoch)

    def _exact_plan(self, state: Mapping[str, Any], consumed: np.ndarray, epoch: int) -> _Plan | None:
        """The plan that continues this rank's pipeline from `state`'s `exact`, validated; None when it
        cannot be used (none given, or made with other options or another DALI)."""
        exacts = state["ranks"] if isinstance(state.get("ranks"), list) else [state.get("exact")]
        if len(exacts) != self.cfg.world_size or any(e is None for e in exacts):
            return None
        for e in exacts:
            if not isinstance(e, Mapping) or set(e) != set(EXACT_KEYS):
                raise FeedrateError(f"loader state: exact must be a mapping of {', '.join(EXACT_KEYS)}")
        fingerprint = self._fingerprint()
        if any(e["spec"] != fingerprint for e in exacts):
            return None
        mine = exact_for(state, self.cfg.rank)
        basis = mine["basis"]
        if basis is not None:
            if not isinstance(basis, str):
                raise FeedrateError("loader state: exact.basis must be a bitmap (base64 text) or null")
            basis = decode(basis, self.total)
            if (basis & ~consumed).any():
                raise FeedrateError("loader state: exact.basis holds samples its `consumed` lacks")
        if any(e["basis"] != mine["basis"] for e in exacts):
            raise FeedrateError("loader state: the ranks' exact.basis differ")
        plan = self._plan(epoch, basis, carried=consumed)
        for key in ("read", "yielded"):
            value = mine[key]
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= plan.part:
                raise FeedrateError(f"loader state: exact.{key} {value!r}; accepted: 0..{plan.part}")
        read, yielded = mine["read"], mine["yielded"]
        handed = [e["yielded"] for e in exacts]
        if not all(isinstance(h, int) for h in handed) or yielded > read:
            raise FeedrateError(f"loader state: exact.yielded {handed!r} must be integers <= exact.read")
        left_out = 0 if basis is None else int(basis.sum())
        if left_out + sum(handed) != state["count"]:
            raise FeedrateError(
                f"loader state: count {state['count']} is not the {left_out} samples left out before "
                f"plus the {sum(handed)} the ranks yielded (exact.yielded)"
            )
        # not only as many: the very samples the ranks' positions handed out (their id digests)
        digests = [e["ids"] for e in exacts]
        if not all(isinstance(d, str) and re.fullmatch(r"[0-9a-f]{16}", d) for d in digests):
            raise FeedrateError(f"loader state: exact.ids {digests!r}; accepted: 16 hex digits per rank")
        handed_out = consumed if basis is None else consumed & ~basis
        if sum(int(d, 16) for d in digests) % (1 << 64) != id_digest(np.flatnonzero(handed_out)):
            raise FeedrateError(
                f"loader state: the {int(handed_out.sum())} samples `consumed` holds beyond exact.basis "
                "are not those the ranks' positions handed out (exact.ids)"
            )
        checkpoint = None
        if 0 < read < plan.part:
            if mine["dali"] is None:
                raise FeedrateError(
                    f"loader state: exact.dali is missing for a rank {read} samples into its part"
                )
            checkpoint = decode_checkpoint(mine["dali"])
            at = checkpoint_position(checkpoint, self._ops.READER_NAME)
            batch = self.cfg.batch_size
            want = (0, read, read // batch, read, [plan.shard_id])
            got = (at.reader_epoch, at.reader_age, at.batches, at.counter, at.shards_id)
            if read % batch or got != want:
                raise FeedrateError(
                    f"loader state: exact.dali is at (reader epoch, samples, batches, counted, shard) {got}; "
                    f"exact.read {read} says {want}"
                )
            # the rest of what DALI restores: a first epoch, and the reader shards of this plan (the
            # PARTIAL policy cuts the padding by them); the epoch length is checked as DALI builds
            want = (0, [0] * plan.num_shards, shard_sizes(plan.readable, plan.num_shards))
            got = (at.pipeline_epoch, at.counter_per_gpu, at.shard_sizes)
            if got != want:
                raise FeedrateError(
                    "loader state: exact.dali's (pipeline epoch, per-shard counters, shard sizes) are "
                    f"{_short(got)}; this plan's are {_short(want)}"
                )
        elif mine["dali"] is not None:
            raise FeedrateError(
                f"loader state: exact.dali given for a rank {read} samples into its part of {plan.part}"
            )
        digest = int(mine["ids"], 16)
        return dataclasses.replace(plan, offset=read, yielded=yielded, digest=digest, checkpoint=checkpoint)

    def stats(self) -> dict[str, int]:
        return self._files.stats(self._skips.count if self._skips else 0).as_dict()

    def close(self) -> None:
        """Release the pipeline and remove the loader's index files and a temporary copy of the shards
        (a cache directory stays)."""
        self._closed = True
        self._drop_ahead()
        self._release()
        self._cleanup()
        if self._files is not None:
            self._files.close()

    def __enter__(self) -> DaliLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
