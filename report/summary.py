"""Per-variant figures: summary.csv, summary.md, and the emulated-accelerator pass line."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from report.runs import Run, natural_key

# MLPerf Storage's pass line: the accelerator must be busy at least 90% of the time.
AU_PASS = 0.90

COLUMNS = [
    "variant",
    "loader",
    "storage",
    "net",
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
    "bound_by",
    "bound_share",
    "feed_img_per_s",
    "cached_img_per_s",
    "twice_readers_img_per_s",
    "au90_accelerator_img_per_s",
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
            record = run.record(ep.epoch)
            what_if = record.get("what_if") or {}
            if rate is None and samples:
                rate = samples / ep.duration
            out.append(
                {
                    "variant": run.label,
                    "loader": run.loader,
                    "storage": run.storage,
                    "net": run.net,
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
                    "bound_by": record.get("bound_by"),
                    "bound_share": record.get("bound_share"),
                    "verdict": run.verdict(ep.epoch),
                    "feed_img_per_s": what_if.get("feed_img_per_s"),
                    **{
                        f"{name}_img_per_s": (what_if.get(name) or {}).get("img_per_s")
                        for name in ("cached", "twice_readers", "au90_accelerator")
                    },
                    "run": str(run.path),
                }
            )
    return out


def emulation_pass_line(runs: list[Run]) -> list[dict[str, Any]]:
    """For each loader (and storage, workers): the highest emulated rate it fed at AU >= 90%, in the
    loaders' name order and each one's rates by value."""
    groups: dict[tuple[str, str, Any], list[tuple[float, float | None]]] = {}
    for run in runs:
        if not run.emulate:
            continue
        aus = [run.au(ep.epoch) for ep in run.train]
        aus = [a for a in aus if a is not None]
        key = (run.loader, run.storage + (f"@{run.net}" if run.net else ""), run.config.get("workers"))
        groups.setdefault(key, []).append((run.emulate, min(aus) if aus else None))
    result = []
    for (loader, storage, workers), points in sorted(groups.items(), key=lambda kv: natural_key(str(kv[0]))):
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


def remote_vs_local(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each remote row's AU and img/s beside the same loader's local run (same workers, emulated rate
    and epoch): how many AU points and what share of throughput the network costs."""
    local = {
        (r["loader"], r["workers"], r["emulated_img_per_s"], r["epoch"]): r
        for r in table
        if r["storage"] == "local"
    }
    out = []
    for r in table:
        if r["storage"] == "local":
            continue
        base = local.get((r["loader"], r["workers"], r["emulated_img_per_s"], r["epoch"]))
        if base is None:
            continue
        both_au = r["au"] is not None and base["au"] is not None
        both_rate = r["img_per_s"] and base["img_per_s"]
        out.append(
            {
                "loader": r["loader"],
                "storage": r["storage"],
                "net": r["net"] or "unnamed",
                "workers": r["workers"],
                "emulated_img_per_s": r["emulated_img_per_s"],
                "epoch": r["epoch"],
                "au_local": base["au"],
                "au_remote": r["au"],
                "au_points_lost": 100 * (base["au"] - r["au"]) if both_au else None,
                "throughput_ratio": r["img_per_s"] / base["img_per_s"] if both_rate else None,
            }
        )
    return out


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


def _verdict_notes(table: list[dict[str, Any]]) -> list[str]:
    """How to read the `bound by` column, and the what-if figures of the runs whose loader reported
    its stages (none yet: said so, and stage_times.png is not drawn)."""
    lines = [
        "",
        "`bound by`: `compute` when the data wait is below 5% of the step time (first batch left out); "
        "otherwise the stage of the data path with the largest share of reader time (run.json `stages`); "
        "empty when the loader reports no stage times and the run waited on data.",
    ]
    staged = [r for r in table if r["feed_img_per_s"] is not None]
    if not staged:
        return [
            *lines,
            "",
            "No loader in these runs reported per-stage times, so stage_times.png is not drawn.",
        ]
    lines += [
        "",
        "## What-if figures (run.json `what_if`; the model and each assumption are written there)",
        "",
        "| variant | epoch | bound by | readers feed img/s | cached img/s | 2x readers img/s "
        "| AU < 90% above img/s |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in staged:
        lines.append(
            f"| {r['variant']} | {r['epoch']} | {r['verdict']} | {_rate(r['feed_img_per_s'])} "
            f"| {_rate(r['cached_img_per_s'])} | {_rate(r['twice_readers_img_per_s'])} "
            f"| {_rate(r['au90_accelerator_img_per_s'])} |"
        )
    return lines


def _rate(value: float | None) -> str:
    return "" if value is None else f"{value:,.0f}"


def write_markdown(table: list[dict[str, Any]], sweep: list[dict[str, Any]], path: Path) -> None:
    kinds = sorted({str(r["dataset_kind"]) for r in table})
    lines = ["# feedrate summary", ""]
    if "synthetic" in kinds:
        lines += ["**Dataset: synthetic CIFAR-shaped data** - accuracy is not a CIFAR-10 figure.", ""]
    lines += [
        "| variant | epoch | epoch s | loading s | data wait | AU | img/s | bound by | train top-1 "
        "| val top-1 | val top-5 | dataset |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in table:
        wait = "" if r["data_wait_fraction"] is None else f"{100 * r['data_wait_fraction']:.1f}%"
        au = "" if r["au"] is None else f"{100 * r['au']:.1f}%"
        rate = "" if r["img_per_s"] is None else f"{r['img_per_s']:,.0f}"
        lines.append(
            f"| {r['variant']} | {r['epoch']} | {r['epoch_s']:.2f} | {r['loading_s']:.2f} | {wait} | {au} "
            f"| {rate} | {r['verdict']} | {_fmt(r['train_top1'])} | {_fmt(r['val_top1'])} "
            f"| {_fmt(r['val_top5'])} | {r['dataset_kind']} |"
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
    lines += _verdict_notes(table)
    pairs = remote_vs_local(table)
    if pairs:
        lines += [
            "",
            "## Remote vs local disk, per network",
            "",
            "| loader | storage | network | workers | emulated img/s | epoch | AU local | AU remote "
            "| AU points lost | remote / local img/s |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for p in pairs:
            lost = "" if p["au_points_lost"] is None else f"{p['au_points_lost']:+.1f}"
            ratio = "" if p["throughput_ratio"] is None else f"{p['throughput_ratio']:.2f}"
            emu = "" if not p["emulated_img_per_s"] else f"{p['emulated_img_per_s']:g}"
            au_l = "" if p["au_local"] is None else f"{100 * p['au_local']:.1f}%"
            au_r = "" if p["au_remote"] is None else f"{100 * p['au_remote']:.1f}%"
            lines.append(
                f"| {p['loader']} | {p['storage']} | {p['net']} | {p['workers']} | {emu} | {p['epoch']} "
                f"| {au_l} | {au_r} | {lost} | {ratio} |"
            )
    path.write_text("\n".join(lines) + "\n")
