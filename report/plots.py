"""The report's figures, with matplotlib (Agg: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from report.runs import Run

DPI = 120


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def loading_vs_compute(table: list[dict[str, Any]], path: Path) -> Path:
    """Stacked bars per variant and epoch: time blocked on the loader, and the rest of the epoch."""
    labels = [f"{r['variant']}\nepoch {r['epoch']}" for r in table]
    loading = [r["loading_s"] for r in table]
    compute = [r["epoch_s"] - r["loading_s"] for r in table]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(table) + 2), 4.5))
    xs = range(len(table))
    ax.bar(xs, compute, label="compute (step)", color="#4c72b0")
    ax.bar(xs, loading, bottom=compute, label="waiting for data", color="#dd8452")
    ax.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("seconds per training epoch")
    ax.set_title("Where the training epoch goes: compute vs waiting for data")
    ax.legend()
    return _save(fig, path)


def cumulative_loading(runs: list[Run], path: Path) -> Path:
    """Per-batch cumulative loading time over the first epoch of each run (type 2 rows)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        if not run.train:
            continue
        rows = run.batch_rows(run.train[0].epoch)
        if rows:
            ax.plot([b.batch for b in rows], [b.loading for b in rows], label=run.label)
    ax.set_xlabel("batch number (epoch 1)")
    ax.set_ylabel("cumulative time waiting for data (s)")
    ax.set_title("Data wait accumulated over an epoch")
    if ax.lines:
        ax.legend(fontsize=8)
    return _save(fig, path)


def throughput(table: list[dict[str, Any]], path: Path) -> Path:
    """Mean training img/s per variant."""
    by_variant: dict[str, list[float]] = {}
    for r in table:
        if r["img_per_s"] is not None:
            by_variant.setdefault(r["variant"], []).append(r["img_per_s"])
    names = list(by_variant)
    means = [sum(v) / len(v) for v in by_variant.values()]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) + 2), 4.5))
    ax.bar(range(len(names)), means, color="#55a868")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("training throughput (images/s)")
    ax.set_title("Training throughput per variant (mean over epochs)")
    for x, value in enumerate(means):
        ax.annotate(f"{value:,.0f}", (x, value), ha="center", va="bottom", fontsize=8)
    return _save(fig, path)


def accuracy(runs: list[Run], path: Path) -> Path:
    """Validation (and training) top-1 per epoch."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        val = [(v.epoch, v.top1) for v in run.val if v.top1 is not None]
        if val:
            (line,) = ax.plot(*zip(*val, strict=True), marker="o", label=f"{run.label} val")
            train = [(t.epoch, t.top1) for t in run.train if t.top1 is not None]
            if train:
                ax.plot(
                    *zip(*train, strict=True), ls="--", color=line.get_color(), label=f"{run.label} train"
                )
    ax.set_xlabel("epoch")
    ax.set_ylabel("top-1 accuracy (fraction)")
    ax.set_ylim(0, 1)
    ax.set_title("Accuracy per epoch")
    if ax.lines:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no accuracy recorded (emulated runs)", ha="center", transform=ax.transAxes)
    return _save(fig, path)
