"""The networks train.py can time, the recipe that trains them, and `Stepper`, which runs one step.

Architectures (`--arch`):
- `resnet50` (default): torchvision's `resnet50(num_classes=10)` unchanged, ImageNet stem included
  (7x7 stride-2 conv + 3x3 stride-2 max-pool, so a 32x32 image reaches the residual stages at 8x8).
  This is the model the seed trained, and its cost per image is the standard ResNet-50's at this input
  size, so figures compare with the seed and with other ResNet-50 measurements. Downsampling 32x32
  images 4x before the first residual stage costs accuracy against the CIFAR stem, which matters less
  here than a step whose cost is the one people mean by "ResNet-50".
- `resnet50-cifar`: the same network with a 3x3 stride-1 stem and no max-pool (the usual CIFAR variant,
  ~16x the FLOPs of the default at 32x32): better accuracy, a heavier step.
- `small`: a three-layer CNN for tests and quick runs on a CPU.

Recipe: SGD with Nesterov momentum 0.9 and weight decay 5e-4 on all parameters (the classic CIFAR
recipe); `--lr` is the peak rate for a batch of 256 and is scaled linearly with the batch size (Goyal et
al., 2017). The rate warms up linearly over the first 5% of all steps (at least one step), then follows a
cosine to zero at the last step, so a one-epoch run and a fifty-epoch run both anneal fully. The schedule
is a function of the fraction of the run's planned steps done: a run resumed with the same counts takes
exactly the steps it would have; one resumed with another world size (or --max-batches), whose planned
steps differ, continues at the same fraction of its own plan (training.checkpoint.schedule_step), with
the peak rate of its own global batch.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from feedrate.errors import FeedrateError

ARCHS = ("resnet50", "resnet50-cifar", "small")
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
LR_REFERENCE_BATCH = 256
WARMUP_FRACTION = 0.05


def small_cnn(num_classes: int) -> nn.Module:
    """Three Conv-BN-ReLU stages of stride 2 (16-32-64 channels), global pooling, one linear layer.

    About 0.7M multiply-adds per image (ResNet-50 with the ImageNet stem: ~85M), so tests and quick runs
    on a shared CPU spend their time in the data path rather than in the model.
    """

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(3, 16),
        *block(16, 32),
        *block(32, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )


def build_model(arch: str, num_classes: int) -> nn.Module:
    """The network called `arch` (one of ARCHS) with `num_classes` outputs."""
    if arch == "small":
        return small_cnn(num_classes)
    from torchvision.models import resnet50

    if arch == "resnet50":
        return resnet50(num_classes=num_classes)
    if arch == "resnet50-cifar":
        model = resnet50(num_classes=num_classes)
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        return model
    raise ValueError(f"unknown arch {arch!r}; accepted: {', '.join(ARCHS)}")


def peak_lr(lr: float, batch_size: int) -> float:
    """`lr` (the rate for a batch of 256) scaled linearly to `batch_size`."""
    return lr * batch_size / LR_REFERENCE_BATCH


def warmup_cosine(step: int, total_steps: int) -> float:
    """The learning-rate factor at `step` (0-based) of `total_steps`: linear warm-up, then cosine to 0."""
    warmup = max(1, round(WARMUP_FRACTION * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(
    model: nn.Module, lr: float, batch_size: int, total_steps: int, first_step: int = 0
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD (Nesterov) and its per-step schedule, as described in the module docstring; `first_step`: the
    schedule starts there (a resumed run: training.checkpoint.schedule_step)."""
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=peak_lr(lr, batch_size),
        momentum=MOMENTUM,
        nesterov=True,
        weight_decay=WEIGHT_DECAY,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(first_step + step, total_steps)
    )
    return optimizer, scheduler


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """How many samples have their label among the top-k logits, for each k (a tensor on the device)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return torch.stack([hits[:, :k].any(dim=1).sum() for k in ks])


class Stepper:
    """The compute side of a batch: a model's training/eval step, or an emulated accelerator's sleep.

    On CUDA: autocast (bf16 where supported, else fp16 with a GradScaler) and channels_last, each
    switchable; on the CPU: fp32 under a nullcontext. Accuracy is counted on the device and read once per
    epoch, so no step waits for a host copy. Emulated (`emulate` = images/s), a training or evaluation
    step sleeps batch/emulate seconds and no model exists.

    `first_step`: where the learning-rate schedule starts (0; a resumed run continues it, and
    `load_state_dict` restores the rest: training.checkpoint).

    `distributed`: the model trains wrapped in DistributedDataParallel (the process group must exist),
    which averages gradients over the ranks inside backward; `batch_size` is then the global batch (the
    learning rate scales with it). Evaluation runs the unwrapped `module`: it has no collective per
    batch, so ranks with different numbers of validation batches never wait for each other.
    """

    def __init__(
        self,
        arch: str,
        num_classes: int,
        device: torch.device,
        *,
        lr: float,
        batch_size: int,
        total_steps: int,
        amp: bool = True,
        channels_last: bool = True,
        emulate: float | None = None,
        distributed: bool = False,
        first_step: int = 0,
    ) -> None:
        self.emulate = emulate
        self.total_steps = total_steps
        self.first_step = first_step
        self.device = device
        cuda = device.type == "cuda"
        self.amp_dtype: torch.dtype | None = None
        if cuda and amp:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.channels_last = cuda and channels_last and emulate is None
        self.correct = torch.zeros(2, dtype=torch.int64, device=device)
        self.seen = 0
        self.steps = 0  # training steps taken by this Stepper (the schedule has moved as many)
        self.module: nn.Module | None = None  # the network itself (None when emulating)
        if emulate is not None:
            return
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels
        self.module = build_model(arch, num_classes).to(device)
        if self.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        self.model: nn.Module = self.module
        if distributed:
            from torch.nn.parallel import DistributedDataParallel

            # Broadcasts rank 0's weights now, so every rank starts from the same model.
            self.model = DistributedDataParallel(self.module, device_ids=[device] if cuda else None)
        self.optimizer, self.scheduler = build_optimizer(self.module, lr, batch_size, total_steps, first_step)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.loss_fn = torch.nn.CrossEntropyLoss()

    @property
    def schedule_step(self) -> int:
        """The schedule's step: where the next training step's learning rate is taken."""
        return self.first_step + self.steps

    def state_dict(self) -> dict[str, Any]:
        """The training state a checkpoint keeps (tensors and plain values only, for a weights-only load):
        the network's parameters and buffers, the optimiser (momentum), the AMP scaler; empty when
        emulating (no model). The schedule's step is not here: the checkpoint's meta.json keeps it (with
        the planned total, to continue at the same fraction of another plan), and the scheduler is built
        at it (`first_step`) before this state is loaded."""
        if self.module is None:
            return {}
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state_dict()`'s `state`. The learning rates stay this run's: its schedule was
        built at the continued step (`first_step`) and its peak from this run's global batch, which may
        differ from the saved run's when the world size changed. A state that does not fit this model is
        a FeedrateError naming what does not. An empty scaler state (saved by a run without fp16 AMP: the
        CPU, bf16, --no-amp) leaves this run's scaler as it starts: a resume may move to an fp16 device,
        whose scaler then begins at its initial scale as a fresh run's does."""
        if self.module is None:
            if state:
                raise FeedrateError("checkpoint: a model state, but this run emulates (--emulate)")
            return
        missing = [k for k in ("model", "optimizer", "scaler") if not isinstance(state.get(k), Mapping)]
        if missing:
            raise FeedrateError(f"checkpoint: no {', '.join(missing)} state (saved by an emulated run?)")
        try:
            self.module.load_state_dict(state["model"])
            rates = [(g["lr"], g.get("initial_lr")) for g in self.optimizer.param_groups]
            self.optimizer.load_state_dict(state["optimizer"])
            for group, (lr, initial) in zip(self.optimizer.param_groups, rates, strict=True):
                group["lr"], group["initial_lr"] = lr, initial
            if state["scaler"]:
                self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            reason = " ".join(str(exc).split())[:300]
            raise FeedrateError(f"checkpoint: the saved state does not fit this model: {reason}") from None

    def counts(self) -> list[int]:
        """The accuracy counts since `take_accuracy` (top-1 hits, top-5 hits, samples), for a checkpoint."""
        return [*map(int, self.correct.tolist()), int(self.seen)]

    def add_counts(self, counts: Sequence[int]) -> None:
        """Add counts a checkpoint carried (its epoch's before the checkpoint) to this epoch's."""
        self.correct += torch.tensor(counts[:2], dtype=self.correct.dtype, device=self.correct.device)
        self.seen += int(counts[2])

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def _forward(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        # A batch comes in either memory format (loaders.augment.normalize keeps an NHWC batch's); on
        # CUDA it is made the model's, so `--no-channels-last` runs NCHW whatever the loader. On the CPU
        # it is left as it is: the conversion would cost the training thread what the loader saved.
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        elif self.device.type == "cuda":
            images = images.contiguous()
        return model(images)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.seen += labels.shape[0]
        self.steps += 1
        if self.emulate is not None:
            time.sleep(labels.shape[0] / self.emulate)
            return
        assert self.module is not None
        if not self.module.training:
            self.model.train()
        with self._autocast():
            logits = self._forward(self.model, images)
            loss = self.loss_fn(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.correct += topk_correct(logits.detach(), labels)

    def eval_step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.seen += labels.shape[0]
        if self.emulate is not None:
            time.sleep(labels.shape[0] / self.emulate)
            return
        assert self.module is not None
        if self.module.training:
            self.model.eval()
        with torch.inference_mode(), self._autocast():
            self.correct += topk_correct(self._forward(self.module, images), labels)

    def take_accuracy(
        self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> tuple[float | None, float | None]:
        """Top-1 and top-5 fractions since the last call (None when emulating), then reset.

        `reduce` sums the counts (top-1 hits, top-5 hits, samples) over the ranks, so the fractions are
        over the whole epoch of every rank, not an average of per-rank fractions.
        """
        counts = torch.cat([self.correct, self.correct.new_tensor([self.seen])])
        if reduce is not None:
            counts = reduce(counts)
        top1_hits, top5_hits, seen = counts.tolist()
        self.seen = 0
        self.correct.zero_()
        if self.emulate is not None or not seen:
            return (None, None)
        return (top1_hits / seen, top5_hits / seen)
