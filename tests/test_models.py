"""training.models: the learning-rate schedule's shape, its scaling with the batch, top-k accuracy, the
networks' outputs and Stepper's accuracy counts (real values, small tensors, the CPU)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from training import models
from training.models import Stepper, build_model, build_optimizer, peak_lr, topk_correct, warmup_cosine


# -- the schedule: linear warm-up over the first 5% of steps, then a cosine to zero ---------------------
def test_warm_up_is_linear_over_the_first_5_percent_of_steps() -> None:
    factors = [warmup_cosine(step, 100) for step in range(100)]
    assert factors[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0]), "5 warm-up steps of 100, up to the peak"
    assert factors[5] == pytest.approx(1.0), "the cosine starts at the peak"
    assert max(factors) == pytest.approx(1.0)


def test_the_cosine_falls_to_zero_at_the_end_and_never_rises() -> None:
    total = 40  # warm-up round(2.0) = 2 steps; the cosine runs over the other 38
    after = [warmup_cosine(step, total) for step in range(2, total + 1)]
    assert all(b <= a for a, b in itertools.pairwise(after)), "monotone after the warm-up"
    assert warmup_cosine(2 + 19, total) == pytest.approx(0.5), "half-way through the cosine: half the peak"
    assert warmup_cosine(total - 1, total) == pytest.approx(0.5 * (1 + math.cos(math.pi * 37 / 38)))
    assert warmup_cosine(total, total) == pytest.approx(0.0, abs=1e-12), "zero once the last step is done"
    assert warmup_cosine(total + 5, total) == pytest.approx(0.0, abs=1e-12), "and it stays there"


def test_a_short_run_still_warms_up_for_one_step() -> None:
    # 5% of 10 steps rounds to 0: the warm-up is still one step long, which starts at the peak.
    assert warmup_cosine(0, 10) == 1.0
    assert warmup_cosine(1, 10) == 1.0, "the cosine starts at the peak"
    assert warmup_cosine(2, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi / 9)))
    assert warmup_cosine(0, 1) == 1.0, "a one-step run trains at the peak"


def test_the_optimizers_rate_follows_the_schedule_step_by_step() -> None:
    model = nn.Linear(4, 2)
    optimizer, scheduler = build_optimizer(model, lr=0.1, batch_size=512, total_steps=40)
    rates = []
    for _ in range(40):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    peak = 0.2  # 0.1 for a batch of 256, scaled to 512
    assert rates[:3] == pytest.approx([peak / 2, peak, peak]), "2 warm-up steps, then the cosine's start"
    assert rates[21] == pytest.approx(peak / 2)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12), "annealed fully at the end"
    group = optimizer.param_groups[0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.9, True, 5e-4)


# -- the peak rate scales linearly with the (global) batch --------------------------------------------
@pytest.mark.parametrize(("batch", "want"), [(256, 0.1), (512, 0.2), (64, 0.025), (1024, 0.4)])
def test_peak_lr_scales_linearly_with_the_batch(batch: int, want: float) -> None:
    assert peak_lr(0.1, batch) == pytest.approx(want)


def test_stepper_scales_the_rate_with_the_global_batch() -> None:
    stepper = Stepper("small", 10, torch.device("cpu"), lr=0.2, batch_size=128, total_steps=20)
    assert stepper.optimizer.param_groups[0]["initial_lr"] == pytest.approx(0.1)
    assert stepper.amp_dtype is None and not stepper.channels_last, "fp32, NCHW on the CPU"


# -- top-k accuracy ------------------------------------------------------------------------------------
def test_topk_counts_hits_among_the_k_highest_logits() -> None:
    logits = torch.tensor(
        [
            [9.0, 1, 2, 3, 4, 5, 6, 7, 8, 0],  # label 0 is the highest: a top-1 (and top-5) hit
            [9.0, 8, 7, 6, 5, 4, 3, 2, 1, 0],  # label 2 is third: a top-5 hit only
            [9.0, 8, 7, 6, 5, 4, 3, 2, 1, 0],  # label 5 is sixth: a miss for both
            [0.0, 1, 2, 3, 4, 5, 6, 7, 8, 9],  # label 9 is the highest
        ]
    )
    labels = torch.tensor([0, 2, 5, 9])
    assert topk_correct(logits, labels).tolist() == [2, 3]
    assert topk_correct(logits, labels, ks=(1, 2, 3, 6)).tolist() == [2, 2, 3, 4]


def test_topk_with_fewer_classes_than_k_counts_every_sample_for_that_k() -> None:
    logits = torch.tensor([[0.1, 0.5, 0.2], [0.3, 0.2, 0.1]])
    assert topk_correct(logits, torch.tensor([2, 0])).tolist() == [1, 2]


def test_take_accuracy_sums_the_counts_over_ranks_and_resets() -> None:
    stepper = Stepper("small", 10, torch.device("cpu"), lr=0.1, batch_size=8, total_steps=4)
    module = stepper.module
    assert module is not None
    for p in module.parameters():
        nn.init.zeros_(p)
    module[-1].bias.data = torch.arange(10.0)  # every image's logits rank classes 9, 8, 7, ...
    images = torch.zeros(8, 3, 32, 32)
    stepper.eval_step(images, torch.tensor([9, 9, 9, 5, 5, 0, 0, 0]))  # top-1: 3, top-5: 5
    # Another rank saw 12 samples with 1 top-1 and 6 top-5 hits: the fractions are the whole epoch's.
    other = torch.tensor([1, 6, 12])
    assert stepper.take_accuracy(lambda counts: counts + other) == (pytest.approx(4 / 20), 11 / 20)
    assert stepper.take_accuracy() == (None, None), "reset: nothing seen since"


def test_emulated_steps_count_no_accuracy() -> None:
    stepper = Stepper("small", 10, torch.device("cpu"), lr=0.1, batch_size=4, total_steps=1, emulate=1e6)
    stepper.train_step(torch.zeros(4, 3, 32, 32), torch.zeros(4, dtype=torch.int64))
    assert stepper.module is None and stepper.take_accuracy() == (None, None)


# -- the networks ----------------------------------------------------------------------------------------
def test_the_networks_give_one_logit_per_class() -> None:
    images = torch.zeros(2, 3, 32, 32)
    for arch in models.ARCHS:
        model = build_model(arch, 10).eval()
        with torch.inference_mode():
            assert model(images).shape == (2, 10), arch
    cifar = build_model("resnet50-cifar", 10)
    assert cifar.conv1.stride == (1, 1) and isinstance(cifar.maxpool, nn.Identity), "the CIFAR stem"
    assert build_model("resnet50", 10).conv1.stride == (2, 2), "the ImageNet stem, unchanged"


def test_an_unknown_arch_names_the_accepted_ones() -> None:
    with pytest.raises(ValueError, match="unknown arch 'vgg'; accepted: resnet50, resnet50-cifar, small"):
        build_model("vgg", 10)
