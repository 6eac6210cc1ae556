"""The report's figures, with matplotlib (Agg: no display needed), made to be read at a glance for a
sweep of 20+ runs: variants in numeric order (report.runs.natural_key), one colour family per loader
with a distinct shade per variant (`palette`), legends outside the axes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib import colormaps

from loaders.stagetimes import STAGES
from report.runs import Run
from report.summary import AU_PASS

DPI = 120
# One sequential colour map per loader (in the order loaders first appear); a variant's shade within it.
FAMILIES = ("Blues", "Oranges", "Greens", "Reds", "Purples", "Greys", "YlOrBr", "PuRd", "BuGn", "GnBu")
STAGE_COLOURS = dict(zip(STAGES, ("#8172b3", "#dd8452", "#55a868", "#c44e52", "#937860"), strict=True))


def palette(items: Sequence[tuple[str, str]]) -> dict[str, tuple[float, float, float, float]]:
    """A colour per (loader, label), all distinct: each loader a colour family of its own, its labels
    shades from mid to dark in the given order (a sweep's lowest rate lightest). More loaders than
    families reuse a family with shifted shades, so colours stay distinct, only less obviously grouped."""
    loaders = list(dict.fromkeys(loader for loader, _ in items))
    out: dict[str, tuple[float, float, float, float]] = {}
    for i, loader in enumerate(loaders):
        cmap = colormaps[FAMILIES[i % len(FAMILIES)]]
        labels = [label for owner, label in items if owner == loader]
        offset = 0.07 * (i // len(FAMILIES))
        for j, label in enumerate(labels):
            shade = (0.45 + 0.5 * j / (len(labels) - 1) if len(labels) > 1 else 0.75) - offset
            out[label] = cmap(shade)
    return out


def _legend(ax: Any, entries: int) -> None:
    """A legend beside the axes, in columns of at most 20, so 20+ lines never cover the data."""
    if entries:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 + (entries - 1) // 20)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def loading_vs_compute(table: list[dict[str, Any]], path: Path) -> Path:
    """Stacked bars per variant and epoch: time blocked on the loader, and the rest of the epoch."""
    several = len({r["epoch"] for r in table}) > 1  # one line per label: two-line ones collide at 20+ bars
    labels = [f"{r['variant']} e{r['epoch']}" if several else r["variant"] for r in table]
    loading = [r["loading_s"] for r in table]
    compute = [r["epoch_s"] - r["loading_s"] for r in table]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(table) + 2), 4.8))
    xs = range(len(table))
    ax.bar(xs, compute, label="compute (step)", color="#4c72b0")
    ax.bar(xs, loading, bottom=compute, label="waiting for data", color="#dd8452")
    ax.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("seconds per training epoch")
    ax.set_title("Where the training epoch goes: compute vs waiting for data")
    ax.legend()
    return _save(fig, path)


def cumulative_loading(runs: list[Run], path: Path) -> Path:
    """Per-batch cumulative loading time over the first epoch of each run (type 2 rows), a distinct
    colour per run, one colour family per loader."""
    colours = palette([(run.loader, run.label) for run in runs])
    fig, ax = plt.subplots(figsize=(12 if len(runs) > 20 else 8.5, 5))
    for run in runs:
        if not run.train:
            continue
        rows = run.batch_rows(run.train[0].epoch)
        if rows:
            ax.plot(
                [b.batch for b in rows], [b.loading for b in rows], label=run.label, color=colours[run.label]
            )
    ax.set_xlabel("batch number (epoch 1)")
    ax.set_ylabel("cumulative time waiting for data (s)")
    ax.set_title("Data wait accumulated over an epoch")
    _legend(ax, len(ax.lines))
    return _save(fig, path)


def au_vs_rate(runs: list[Run], path: Path) -> Path | None:
    """AU against the emulated accelerator rate (log x), one line per loader (and storage, workers),
    the 90% pass line drawn; None (no file) when no run was emulated. A point is an epoch's AU, the
    lowest when a run has several (as the summary's pass line judges it)."""
    lines: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for run in runs:
        aus = [a for a in (run.au(ep.epoch) for ep in run.train) if a is not None]
        if run.emulate and aus:
            key = (run.loader, run.label.replace(f"/emu{run.emulate:g}", ""))
            lines.setdefault(key, []).append((run.emulate, min(aus)))
    if not lines:
        return None
    by_loader = list(dict.fromkeys(loader for loader, _ in lines))
    colours = palette([(loader, name) for loader, name in lines])
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    markers = "osD^vP*X"
    for (loader, name), points in lines.items():
        xs, ys = zip(*sorted(points), strict=True)
        marker = markers[by_loader.index(loader) % len(markers)]
        ax.plot(xs, [100 * y for y in ys], marker=marker, color=colours[name], label=name)
    ax.axhline(100 * AU_PASS, color="black", ls="--", lw=1)
    # below the line at the right edge: the lines start at the left, near 100%, and would cover it
    where = (0.99, 100 * AU_PASS - 1)
    ax.annotate(
        f"pass: AU >= {100 * AU_PASS:.0f}%", where, xycoords=("axes fraction", "data"), va="top", ha="right"
    )
    ax.set_xscale("log")
    ax.set_xlabel("emulated accelerator rate (images/s, log scale)")
    ax.set_ylabel("AU (% of time the accelerator is busy)")
    low = min(100 * y for pts in lines.values() for _, y in pts)
    ax.set_ylim(max(0.0, min(low, 100 * AU_PASS) - 5), 101)
    ax.set_title("Which data path keeps the accelerator busy: AU against its speed")
    ax.grid(True, which="both", alpha=0.3)
    _legend(ax, len(lines))
    return _save(fig, path)


def stage_times(runs: list[Run], path: Path) -> Path | None:
    """Per variant a stacked bar of the data path's stage times per image (us of reader time, summed
    over readers, training epochs together; run.json `stages`) with its verdict; None (no file) when no
    run's loader reported stages."""
    bars: list[tuple[str, dict[str, float], str]] = []
    for run in runs:
        seconds: dict[str, float] = {}
        samples = 0
        for ep in run.train:
            stages = run.stages(ep.epoch)
            if stages:
                samples += run.samples(ep.epoch) or 0
                for stage, value in stages.items():
                    seconds[stage] = seconds.get(stage, 0.0) + value
        if seconds and samples:
            per_image = {stage: 1e6 * value / samples for stage, value in seconds.items()}
            bars.append((run.label, per_image, run.verdict(run.train[-1].epoch)))
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(9, max(3.0, 0.32 * len(bars) + 1.6)))
    ys = range(len(bars))
    left = [0.0] * len(bars)
    for stage in STAGES:
        widths = [b[1].get(stage, 0.0) for b in bars]
        if any(widths):
            ax.barh(ys, widths, left=left, color=STAGE_COLOURS[stage], label=stage)
            left = [x + w for x, w in zip(left, widths, strict=True)]
    for y, (_, _, verdict) in enumerate(bars):
        if verdict:
            ax.annotate(f" {verdict}", (left[y], y), va="center", fontsize=7)
    ax.set_yticks(list(ys), [b[0] for b in bars], fontsize=7)
    ax.invert_yaxis()  # the first variant on top, as in the summary
    ax.set_xlim(0, 1.25 * max(left))
    ax.set_xlabel("reader time per image (us, summed over readers; a stage not reported is left out)")
    ax.set_title("Where the data path's time goes, per stage")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def throughput(table: list[dict[str, Any]], path: Path) -> Path:
    """Mean training img/s per variant, coloured as the other plots colour its run."""
    by_variant: dict[str, list[float]] = {}
    owner: dict[str, str] = {}
    for r in table:
        if r["img_per_s"] is not None:
            by_variant.setdefault(r["variant"], []).append(r["img_per_s"])
            owner[r["variant"]] = r["loader"]
    names = list(by_variant)
    means = [sum(v) / len(v) for v in by_variant.values()]
    colours = palette([(owner[n], n) for n in names])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(names) + 2), 4.5))
    ax.bar(range(len(names)), means, color=[colours[n] for n in names])
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
