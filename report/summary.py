"""Per-variant figures: summary.csv, summary.md, and the emulated-accelerator pass line."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from report.runs import Run

# MLPerf Storage's pass line: the accelerator must be busy at least 90% of the time.
AU_PASS = 0.90

COLUMNS = [
    "variant",
    "loader",
    "storage",
    "workers",
    "emulated_img_per_s",
    "dataset_kind",
    "epoch",
    "epoch_s",
    "loading_s",
    "data_wait_fraction",
    "au",
    "img_per_s",
    "train_top1",
    "train_top5",
    "val_top1",
    "val_top5",
    "run",
]


def rows(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per run and training epoch, every figure taken from the CSV (img/s from run.json)."""
    out = []
    for run in runs:
        val = {v.epoch: v for v in run.val}
        for ep in run.train:
            v = val.get(ep.epoch)
            samples = run.samples(ep.epoch)
            rate = run.img_per_s(ep.epoch)
            if rate is None and samples:
                rate = samples / ep.duration
            out.append(
                {
                    "variant": run.label,
                    "loader": run.loader,
                    "storage": run.storage,
                    "workers": run.config.get("workers"),
                    "emulated_img_per_s": run.emulate,
                    "dataset_kind": run.kind,
                    "epoch": ep.epoch,
                    "epoch_s": ep.duration,
                    "loading_s": ep.loading,
                    "data_wait_fraction": ep.loading / ep.duration if ep.duration else None,
                    "au": run.au(ep.epoch),
                    "img_per_s": rate,
                    "train_top1": ep.top1,
                    "train_top5": ep.top5,
                    "val_top1": v.top1 if v else None,
                    "val_top5": v.top5 if v else None,
                    "run": str(run.path),
                }
            )
    return out


def emulation_pass_line(runs: list[Run]) -> list[dict[str, Any]]:
    """For each loader (and storage, workers): the highest emulated rate it fed at AU >= 90%."""
    groups: dict[tuple[str, str, Any], list[tuple[float, float | None]]] = {}
    for run in runs:
        if not run.emulate:
            continue
        aus = [run.au(ep.epoch) for ep in run.train]
        aus = [a for a in aus if a is not None]
        key = (run.loader, run.storage, run.config.get("workers"))
        groups.setdefault(key, []).append((run.emulate, min(aus) if aus else None))
    result = []
    for (loader, storage, workers), points in sorted(groups.items(), key=lambda kv: str(kv[0])):
        passing = [rate for rate, au in points if au is not None and au >= AU_PASS]
        result.append(
            {
                "loader": loader,
                "storage": storage,
                "workers": workers,
                "rates_tried": sorted(rate for rate, _ in points),
                "au_at_rates": {f"{rate:g}": au for rate, au in sorted(points)},
                "max_rate_at_au90": max(passing) if passing else None,
            }
        )
    return result


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_csv(table: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in table:
            writer.writerow({k: _fmt(row[k], 6) if isinstance(row[k], float) else row[k] for k in COLUMNS})


def write_markdown(table: list[dict[str, Any]], sweep: list[dict[str, Any]], path: Path) -> None:
    kinds = sorted({str(r["dataset_kind"]) for r in table})
    lines = ["# feedrate summary", ""]
    if "synthetic" in kinds:
        lines += ["**Dataset: synthetic CIFAR-shaped data** - accuracy is not a CIFAR-10 figure.", ""]
    lines += [
        "| variant | epoch | epoch s | loading s | data wait | AU | img/s | train top-1 | val top-1 "
        "| val top-5 | dataset |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in table:
        wait = "" if r["data_wait_fraction"] is None else f"{100 * r['data_wait_fraction']:.1f}%"
        au = "" if r["au"] is None else f"{100 * r['au']:.1f}%"
        rate = "" if r["img_per_s"] is None else f"{r['img_per_s']:,.0f}"
        lines.append(
            f"| {r['variant']} | {r['epoch']} | {r['epoch_s']:.2f} | {r['loading_s']:.2f} | {wait} | {au} "
            f"| {rate} | {_fmt(r['train_top1'])} | {_fmt(r['val_top1'])} | {_fmt(r['val_top5'])} "
            f"| {r['dataset_kind']} |"
        )
    if sweep:
        lines += [
            "",
            "## Emulated accelerator: the highest rate each loader feeds at AU >= 90%",
            "",
            "| loader | storage | workers | rates tried (img/s) | AU at each | max rate at AU >= 90% |",
            "|---|---|---:|---|---|---:|",
        ]
        for s in sweep:
            aus = ", ".join(
                f"{rate}: {'n/a' if au is None else f'{100 * au:.0f}%'}"
                for rate, au in s["au_at_rates"].items()
            )
            best = "none passed" if s["max_rate_at_au90"] is None else f"{s['max_rate_at_au90']:,.0f}"
            tried = ", ".join(f"{r:g}" for r in s["rates_tried"])
            lines.append(f"| {s['loader']} | {s['storage']} | {s['workers']} | {tried} | {aus} | {best} |")
    path.write_text("\n".join(lines) + "\n")
