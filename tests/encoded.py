"""Test data that identifies itself: every image's pixels hold its sample index and label."""

from __future__ import annotations

import numpy as np
import torch

from loaders.base import CIFAR10_MEAN, CIFAR10_STD


def encoded_images(n: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n images whose pixels say who they are: R, G = sample index (low, high byte), B = 20 * label.

    Every pixel of an image holds the same value, so any crop (whose centre is always original
    content with 4-pixel padding) or flip still reads back the sample's index and label.
    """
    index = np.arange(offset, offset + n)
    labels = (index * 7 + 3) % 10
    images = np.empty((n, 32, 32, 3), dtype=np.uint8)
    images[..., 0] = (index % 256)[:, None, None]
    images[..., 1] = (index // 256)[:, None, None]
    images[..., 2] = (labels * 20)[:, None, None]
    return images, labels.astype(np.int64)


def decode_identity(batch: torch.Tensor) -> tuple[list[int], list[int]]:
    """(sample indices, labels) read back from the centre pixel of normalised NCHW images."""
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3)
    std = torch.tensor(CIFAR10_STD).view(1, 3)
    centre = batch[:, :, 16, 16].float().cpu() * std + mean
    values = torch.round(centre * 255).long()
    index = (values[:, 0] + 256 * values[:, 1]).tolist()
    labels = (values[:, 2] // 20).tolist()
    return index, labels
