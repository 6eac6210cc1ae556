"""Batched augmentation against torchvision's per-sample transforms (the baseline's semantics)."""

from __future__ import annotations

import sys

import pytest
import torch
import torchvision.transforms.functional as F
from torchvision import transforms

from feedrate.errors import FeedrateError
from loaders.augment import augment, crop_flip, normalize, random_crop_flip
from loaders.base import CIFAR10_MEAN, CIFAR10_STD


def batch(n: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def test_crop_flip_equals_pad_crop_hflip_per_sample() -> None:
    images = batch()
    g = torch.Generator().manual_seed(1)
    dy, dx = torch.randint(0, 9, (2, len(images)), generator=g)
    flip = torch.rand(len(images), generator=g) < 0.5
    out = crop_flip(images, dy, dx, flip, padding=4, layout="NHWC")
    for i in range(len(images)):
        padded = F.pad(images[i].permute(2, 0, 1), [4], fill=0)
        expected = F.crop(padded, int(dy[i]), int(dx[i]), 32, 32)
        if flip[i]:
            expected = F.hflip(expected)
        assert torch.equal(out[i], expected), f"sample {i} (dy={dy[i]}, dx={dx[i]}, flip={flip[i]})"
    nchw = crop_flip(images.permute(0, 3, 1, 2).contiguous(), dy, dx, flip, padding=4, layout="NCHW")
    assert torch.equal(out, nchw), "either input layout gives the same NCHW result"


def test_random_crop_flip_draws_every_offset_and_both_flips() -> None:
    images = torch.zeros((2000, 32, 32, 3), dtype=torch.uint8)
    images[:, :, 0] = 255  # the left column marks where the image went
    out = random_crop_flip(images, torch.Generator().manual_seed(0), layout="NHWC")
    columns = (out[:, 0] == 255).all(dim=1)  # (n, 32): which output column holds the marked one
    found = columns.float().argmax(dim=1)[columns.any(dim=1)]
    # unflipped crops put it at column 4 - dx (0..4 when visible), flipped ones at 27 + dx
    assert set(found.tolist()) == set(range(5)) | set(range(27, 32))
    assert (~columns.any(dim=1)).sum() > 0, "crops that cut the marked column off happen too"


def test_same_generator_seed_same_augmentation() -> None:
    images = batch()
    a = augment(images, torch.Generator().manual_seed(5), "NHWC")
    b = augment(images, torch.Generator().manual_seed(5), "NHWC")
    c = augment(images, torch.Generator().manual_seed(6), "NHWC")
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (48, 3, 32, 32) and a.dtype == torch.float32
    assert a.is_contiguous(memory_format=torch.channels_last)  # an NHWC batch's bytes stay where they lie


def test_normalize_keeps_the_memory_layout_and_the_values() -> None:
    images = batch(40)
    nchw = images.permute(0, 3, 1, 2).contiguous()
    plain = normalize(nchw, "NCHW")
    assert plain.is_contiguous()
    for last in (normalize(images, "NHWC"), normalize(images.permute(0, 3, 1, 2), "NCHW")):
        assert last.is_contiguous(memory_format=torch.channels_last) and not last.is_contiguous()
        assert torch.equal(last, plain)  # the same values to the bit, in either memory format
    # a strided NHWC view (not contiguous) takes the general path and still gets every value right
    assert torch.equal(normalize(images[::2], "NHWC"), plain[::2])


def test_normalize_of_an_empty_batch_is_an_empty_batch() -> None:
    for images, layout in ((batch(0), "NHWC"), (batch(0).permute(0, 3, 1, 2), "NCHW")):
        assert normalize(images, layout).shape == (0, 3, 32, 32)


def test_normalize_writes_into_a_given_buffer_and_refuses_one_that_does_not_fit() -> None:
    images = batch(8)
    out = torch.full((8, 3, 32, 32), float("nan")).contiguous(memory_format=torch.channels_last)
    assert normalize(images, "NHWC", out=out) is out
    assert torch.equal(out, normalize(images, "NHWC"))
    part = torch.zeros((16, 3, 32, 32)).contiguous(memory_format=torch.channels_last)
    normalize(images, "NHWC", out=part[:8])  # a slice of a larger batch buffer
    assert torch.equal(part[:8], out) and not part[8:].any()
    for wrong in (
        torch.zeros((8, 3, 32, 32)),
        torch.zeros((7, 3, 32, 32)),
        torch.zeros((8, 3, 32, 32)).double(),
    ):
        with pytest.raises(FeedrateError, match=r"normalize: out is .*expected float32"):
            normalize(images, "NHWC", out=wrong)


def test_normalize_equals_to_tensor_and_normalize() -> None:
    images = batch(8)
    reference = transforms.Compose([transforms.ToTensor(), transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    expected = torch.stack([reference(image.numpy()) for image in images])
    assert torch.allclose(normalize(images, "NHWC"), expected, atol=1e-5)
    assert torch.allclose(normalize(images.permute(0, 3, 1, 2).contiguous(), "NCHW"), expected, atol=1e-5)


def test_bad_layout_and_dtype() -> None:
    with pytest.raises(FeedrateError, match=r"unknown layout 'HWC'; accepted: NCHW, NHWC"):
        normalize(batch(2), "HWC")
    with pytest.raises(FeedrateError, match="expected a uint8 batch"):
        normalize(batch(2).float(), "NHWC")


def test_the_cpu_row_path_equals_the_general_path_with_and_without_opencv(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    images = batch(40, seed=3)
    g = torch.Generator().manual_seed(2)
    dy, dx = torch.randint(0, 9, (2, len(images)), generator=g)
    flip = torch.rand(len(images), generator=g) < 0.5
    general = crop_flip(images.permute(0, 3, 1, 2).contiguous(), dy, dx, flip, padding=4, layout="NCHW")
    assert torch.equal(crop_flip(images, dy, dx, flip, padding=4, layout="NHWC"), general)
    monkeypatch.setitem(sys.modules, "cv2", None)  # the mirror made by torch.flip instead of OpenCV
    assert torch.equal(crop_flip(images, dy, dx, flip, padding=4, layout="NHWC"), general)
    smaller = batch(7, seed=4)  # a partial last batch: a canvas of its own size, zero borders again
    expected = crop_flip(smaller.permute(0, 3, 1, 2).contiguous(), dy[:7], dx[:7], flip[:7], 4, "NCHW")
    assert torch.equal(crop_flip(smaller, dy[:7], dx[:7], flip[:7], padding=4, layout="NHWC"), expected)
