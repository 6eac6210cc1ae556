"""Synthetic CIFAR-shaped data that a network can actually learn.

Used where the real CIFAR-10 cannot be had (offline machines, CI). Random noise would time the data path
just as well, but a run whose accuracy stays at chance cannot show that training works, so every class
gets its own structure: a tint and a sinusoidal grating with a class-specific orientation and frequency,
drawn with a random phase (so crops and flips keep the class), random contrast and pixel noise.

Deterministic: the class templates are fixed, the samples depend only on the seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from feedrate.cifar import BATCH_DIR, CLASS_NAMES, CifarData, write_batch_dir

TEMPLATE_SEED = 20_260_101  # fixed: the task is the same for every seed
CHUNK = 4096


def _templates(num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(TEMPLATE_SEED)
    tints = rng.uniform(-35.0, 35.0, size=(num_classes, 3))
    angles = np.pi * np.arange(num_classes) / num_classes
    freqs = 2.0 * np.pi * rng.choice([2.0, 3.0, 4.0], size=num_classes) / 32.0
    return tints, angles, freqs


def generate(
    n: int, seed: int | np.random.SeedSequence, num_classes: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """`n` images (n, 32, 32, 3) uint8 and balanced, shuffled labels (n,) int64."""
    rng = np.random.default_rng(seed)
    labels = np.resize(np.arange(num_classes, dtype=np.int64), n)
    rng.shuffle(labels)
    tints, angles, freqs = _templates(num_classes)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    images = np.empty((n, 32, 32, 3), dtype=np.uint8)
    for start in range(0, n, CHUNK):
        lab = labels[start : start + CHUNK]
        m = len(lab)
        phase = rng.uniform(0, 2 * np.pi, size=(m, 1, 1)).astype(np.float32)
        contrast = rng.uniform(35.0, 70.0, size=(m, 1, 1, 1)).astype(np.float32)
        ang = angles[lab][:, None, None]
        proj = np.cos(ang) * xx + np.sin(ang) * yy
        grating = np.sin(freqs[lab][:, None, None] * proj + phase).astype(np.float32)
        base = 128.0 + tints[lab][:, None, None, :] + rng.normal(0, 12.0, size=(m, 1, 1, 3))
        pixels = base + contrast * grating[..., None] + rng.normal(0, 18.0, size=(m, 32, 32, 3))
        images[start : start + m] = np.clip(pixels, 0, 255).astype(np.uint8)
    return images, labels


def test_seed(seed: int) -> np.random.SeedSequence:
    """The test split's stream of a run seeded `seed`: its own spawn key, so no seed below 2**128 has it
    as its training stream (numpy pads a seed to 128 bits before the key; an offset seed, as before,
    made seed s's test split seed s + 1,000,003's training split)."""
    return np.random.SeedSequence(seed, spawn_key=(1,))


def make(scratch: Path, n_train: int, n_test: int, seed: int) -> CifarData:
    """Synthetic splits, also written as CIFAR python batches under `scratch` (kept by shardgen)."""
    if n_train < 1 or n_test < 1:
        raise ValueError(f"synthetic sizes must be >= 1, got train={n_train} test={n_test}")
    splits = {
        "train": generate(n_train, seed),
        "test": generate(n_test, test_seed(seed)),
    }
    batch_dir = Path(scratch) / BATCH_DIR
    write_batch_dir(batch_dir, splits, CLASS_NAMES, label="synthetic")
    return CifarData(
        splits=splits,
        class_names=list(CLASS_NAMES),
        kind="synthetic",
        source=f"synthetic(train={n_train}, test={n_test}, seed={seed})",
        batch_dir=batch_dir,
    )
