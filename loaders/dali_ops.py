"""The DALI graph of the `dali` loader: webdataset reader -> decode -> crop-pad-4 + flip + normalise.

Kept apart from the loader (loaders.dali_pipe) because this is the only module that speaks DALI's graph
language; it is imported only after DALI has been found importable.

Why the reader is set up the way it is (each choice was checked by reading every sample back):

- `pad_last_batch=True`. With False the reader fills the last batch of an epoch from the next epoch and
  its shuffle buffer then carries those samples over: epochs 2+ repeat some samples and miss others
  (measured: 19,916 distinct of 20,000 in the second epoch). With True the reader pads the rank's part
  with copies of its last sample up to whole batches, and the PARTIAL iterator policy cuts the copies
  off again, so what the training loop sees has no repeats and the next epoch starts clean.
- Training: `random_shuffle` (a buffer of `initial_fill` samples) plus `shuffle_after_epoch` (the tar
  order, reshuffled every epoch, the same on every rank). shardgen shuffled the samples when it wrote
  them, so a local buffer plus a new shard order per epoch mixes well without random access. The rank
  parts are contiguous sample ranges of that order, so they stay disjoint and their sizes stay fixed.
- Evaluation: stored order, `stick_to_shard=True` (each rank keeps its part).

Reading: DALI maps the tar files (`dont_use_mmap=False`, its default) and reads them ahead
(`read_ahead=True`). Measured on the 2-core machine, reader-only (decode-free raw shards, CPU time of
the process per image, 4 alternating rounds): mmap 9.6 us, mmap + read_ahead 8.5, plain reads
(`dont_use_mmap=True`) 13.6 -- a syscall per component. With the shards evicted from the page cache
first (posix_fadvise DONTNEED), mmap alone ran 133k img/s at 11.6 us and mmap + read_ahead 167k at 9.6,
as fast as from a warm cache: read_ahead pulls the files in when the pipeline is built, where mmap
alone faults them in sample by sample inside the timed epoch. Where the files lie did not matter: the
dataset in place, a copy on the same ext4 disk and one on tmpfs ran within noise of each other.

Augmentation equals the torchvision baseline's (RandomCrop(32, padding=4), RandomHorizontalFlip,
ToTensor, Normalize): an integer offset in [-4, 4] per axis with zero fill outside the image, a coin
flip, and (x - 255 mean) / (255 std) to float32 CHW. The padding is zero before normalisation, as in
torchvision. Where it runs depends on the device:
- on a GPU, in the graph (slice + crop_mirror_normalize on the GPU, after nvJPEG's decode);
- on the CPU, not in the graph (`GraphSpec.augment=False`): the graph ends with the decoded uint8 HWC
  images and the loader augments the whole batch with a few torch ops (loaders.augment). DALI's CPU
  operators work per sample; at 32x32 their per-sample cost dominates: slice with padding ~15 us and
  crop_mirror_normalize ~10 us per image, against ~5 us for the batched torch ops.

Labels: `.cls` holds ASCII digits of any length; they leave the graph as read and are turned into
integers in one vectorised step on the host (loaders.dali_pipe.parse_labels). Parsing them in the
graph (slice + cast + weighted sum) cost about 20 us per sample on the CPU, more than the whole
augmentation. The index files the loader hands the reader widen each label component to its 512-byte
tar header and first data block (loaders.dali_state), so a label row is that header, which names the
sample, then the block that holds the digits (from `LABEL_AT`): 1024 bytes for every sample, a dense
batch with no padding operator.

Checkpoints: every pipeline is built with `enable_checkpointing=True` (DALI: no cost while running;
measured within noise), and `build_pipeline(spec, checkpoint)` restores one (loaders.dali_state says
what it holds). With checkpointing on, DALI's `shuffle_after_epoch` draws each epoch's tar order from
(`order_seed`, the reader's epoch) afresh, so a pipeline's first epoch -- the only one the loader reads
from a pipeline -- is a function of its seeds alone. The reader's shuffle buffer is seeded by
`reader_seed`, its own argument, not by whatever DALI derives from the pipeline's seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import Pipeline

from feedrate.manifest import ENCODINGS
from feedrate.shardformat import LABEL_EXT
from loaders.base import CIFAR10_MEAN, CIFAR10_STD, CROP_PADDING
from loaders.dali_state import TAR_BLOCK

READER_NAME = "shards"
OUTPUT_NAMES = ("images", "labels")
IMAGE_SIZE = 32
RAW_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 3)
# A label row: the label member's tar header, then its first data block from LABEL_AT. The loader parses
# its first LABEL_WIDTH bytes: more than any class index has digits, and enough to show a bad label.
LABEL_AT = TAR_BLOCK
LABEL_WIDTH = 64


@dataclass(frozen=True)
class GraphSpec:
    """Everything the graph depends on; one spec, one pipeline."""

    paths: tuple[str, ...]  # local tar files of the split (or of what is left of it), in manifest order
    index_paths: tuple[str, ...]  # their DALI index files, label spans widened (loaders.dali_state)
    encoding: str  # "jpg" | "png" | "raw"
    train: bool
    batch_size: int
    threads: int
    prefetch: int  # pipeline prefetch queue depth (batches)
    initial_fill: int  # shuffle buffer (samples)
    seed: int  # per-rank pipeline seed: the augmentation in the graph
    order_seed: int  # shard-order seed: the same on every rank so their parts stay disjoint
    reader_seed: int  # per-rank seed of the reader's shuffle buffer
    shard_id: int
    num_shards: int
    device_id: int | None  # None: CPU operators only; else the GPU for decode and augmentation
    hw_decoder_load: float = 0.65  # share of jpg decoding given to the hardware decoder (A100/H100)
    skip_incomplete: bool = False  # leave out samples that lack their image or label (else an error)
    augment: bool = True  # crop, flip and normalise in the graph; False: decoded uint8 HWC images out

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ValueError(f"unknown encoding {self.encoding!r}; accepted: {', '.join(ENCODINGS)}")
        if len(self.paths) != len(self.index_paths) or not self.paths:
            raise ValueError(f"{len(self.paths)} shards but {len(self.index_paths)} index files")


def build_pipeline(spec: GraphSpec, checkpoint: bytes | None = None) -> Pipeline:
    """A built DALI pipeline with outputs `images` (float32 NCHW; with `augment=False` the decoded
    uint8 NHWC batch) and `labels` (uint8: the label's tar header, then its first data block), at the
    start of its first epoch or where `checkpoint` (`Pipeline.checkpoint`'s bytes, of a pipeline of the
    same spec) left one."""
    pipe = _graph(
        spec,
        batch_size=spec.batch_size,
        num_threads=spec.threads,
        device_id=spec.device_id,
        prefetch_queue_depth=spec.prefetch,
        seed=spec.seed,
        enable_checkpointing=True,
        checkpoint=checkpoint,
    )
    pipe.build()
    return pipe


@pipeline_def(enable_conditionals=False)
def _graph(spec: GraphSpec):  # type: ignore[no-untyped-def]  # a DALI graph, traced once
    if spec.train:
        order = dict(
            random_shuffle=True,
            initial_fill=spec.initial_fill,
            shuffle_after_epoch=True,
            shuffle_after_epoch_seed=spec.order_seed,
        )
    else:
        order = dict(stick_to_shard=True)
    encoded, cls = fn.readers.webdataset(
        name=READER_NAME,
        paths=list(spec.paths),
        index_paths=list(spec.index_paths),
        ext=[spec.encoding, LABEL_EXT],
        missing_component_behavior="skip" if spec.skip_incomplete else "error",
        pad_last_batch=True,
        read_ahead=True,
        seed=spec.reader_seed,
        shard_id=spec.shard_id,
        num_shards=spec.num_shards,
        **order,
    )
    images = decode(encoded, spec.encoding, gpu=spec.device_id is not None, hw_load=spec.hw_decoder_load)
    if spec.augment:
        images = augment_normalise(images, spec.train)
    return images, cls


def decode(encoded, encoding: str, gpu: bool, hw_load: float):  # type: ignore[no-untyped-def]
    """HWC uint8 images. jpg: nvJPEG on the GPU ("mixed"); png: DALI decodes png on the host even in
    "mixed" (nvJPEG has no png path) and copies the pixels up; raw: no decoding, a reshape of the 3,072
    bytes, then a copy to the GPU when there is one."""
    if encoding == "raw":
        images = fn.reshape(encoded, shape=list(RAW_SHAPE), layout="HWC")
        return images.gpu() if gpu else images
    if gpu:
        return fn.decoders.image(encoded, device="mixed", output_type=types.RGB, hw_decoder_load=hw_load)
    return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)


def augment_normalise(images, train: bool):  # type: ignore[no-untyped-def]
    """Training: random 32x32 crop of the zero-padded image and a random flip; then normalise to
    float32 CHW. The random arguments are drawn on the CPU (DALI's argument inputs live there)."""
    mean = [255.0 * m for m in CIFAR10_MEAN]
    std = [255.0 * s for s in CIFAR10_STD]
    if not train:
        return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std)
    offsets = list(range(-CROP_PADDING, CROP_PADDING + 1))
    anchor = fn.random.uniform(values=offsets, shape=[2], dtype=types.INT32)  # (x, y)
    window = types.Constant(np.array([IMAGE_SIZE, IMAGE_SIZE], dtype=np.int32))
    images = fn.slice(images, anchor, window, axis_names="WH", out_of_bounds_policy="pad", fill_values=0)
    mirror = fn.random.coin_flip(probability=0.5)
    return fn.crop_mirror_normalize(
        images, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std, mirror=mirror
    )
