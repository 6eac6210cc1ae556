"""The baseline's two passes in a run: the ratio base, their spread, and the flag on an unsteady run.

This machine's torchvision baseline has read from ~4k to ~11k img/s in different runs (other work on a
shared 2-core machine), so a ratio is only as good as the baseline of its own run. The bench measures the
baseline first and last (bench.variants.plan); every ratio is to the mean of the two, and a run whose two
passes differ by more than `THRESHOLD` is flagged in bench.json (`baseline.flagged`) and in bench.md: the
machine's speed changed while the loaders were measured, so their ratios mix two machines.
"""

from __future__ import annotations

from typing import Any

from bench.variants import BASELINE, FIRST, LAST

THRESHOLD = 0.15  # the faster pass more than 15% above the slower one: the run is flagged


def spread(first: float, last: float) -> float:
    """How far apart two passes are: the faster one's excess over the slower one, as a fraction of the
    slower (100 and 116 img/s: 0.16, either way round)."""
    if first <= 0 or last <= 0:
        raise ValueError(f"baseline passes must be > 0 img/s; got {first} and {last}")
    return max(first, last) / min(first, last) - 1


def unsteady(first: float, last: float, threshold: float = THRESHOLD) -> bool:
    """Whether two baseline passes differ by more than `threshold` (bench.md's warning, the JSON flag);
    compared without a division, so that 100 and 115 img/s are exactly 15% apart, not flagged."""
    spread(first, last)  # the same check of the values
    return abs(first - last) > threshold * min(first, last)


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The bench JSON's `baseline` object from the measured rows: per worker count, the first and last
    passes, their mean (the ratio base), their spread, and whether the run is flagged (and why)."""
    passes: dict[int, dict[str, float]] = {}
    for r in results:
        if (r["loader"], r["storage"]) == BASELINE and r.get("baseline_pass") and "skipped" not in r:
            passes.setdefault(r["workers"], {})[r["baseline_pass"]] = r["img_per_s"]
    workers = sorted({r["workers"] for r in results if r.get("baseline_pass")})
    entries = []
    for w in workers:
        first, last = passes.get(w, {}).get(FIRST), passes.get(w, {}).get(LAST)
        measured = [v for v in (first, last) if v is not None]
        entry: dict[str, Any] = {
            "workers": w,
            "first_img_per_s": first,
            "last_img_per_s": last,
            "mean_img_per_s": round(sum(measured) / len(measured), 1) if measured else None,
            "spread": None,
            "flagged": True,
            "why": None,
        }
        if first is not None and last is not None:
            entry["spread"] = round(spread(first, last), 3)
            entry["flagged"] = unsteady(first, last)
            if entry["flagged"]:
                entry["why"] = f"first and last passes differ by {100 * entry['spread']:.0f}%"
        else:
            missing = " and ".join(p for p, v in ((FIRST, first), (LAST, last)) if v is None)
            entry["why"] = f"the {missing} baseline pass did not run: the run's steadiness is unknown"
        entries.append(entry)
    return {
        "loader": BASELINE[0],
        "storage": BASELINE[1],
        "ratio_base": "mean of the first and last passes (same workers)",
        "threshold": THRESHOLD,
        "flagged": any(e["flagged"] for e in entries),
        "passes": entries,
    }


def add_ratios(results: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """`ratio_to_baseline` on every measured row: its img/s over the mean baseline of its worker count
    (None when no baseline pass of that count ran)."""
    base = {e["workers"]: e["mean_img_per_s"] for e in summary["passes"]}
    for r in results:
        if "skipped" not in r:
            mean = base.get(r["workers"])
            r["ratio_to_baseline"] = round(r["img_per_s"] / mean, 3) if mean else None


def describe(summary: dict[str, Any]) -> str:
    """bench.md's lines on the baseline: both passes and their spread per worker count, and a warning
    line for each flagged one."""
    lines = []
    for e in summary["passes"]:
        passes = ((FIRST, e["first_img_per_s"]), (LAST, e["last_img_per_s"]))
        body = ", ".join(f"{p} {v:,.0f} img/s" for p, v in passes if v is not None) or "not measured"
        if e["spread"] is not None:
            mean, gap = e["mean_img_per_s"], 100 * e["spread"]
            body += f"; mean {mean:,.0f} img/s, the ratio base (spread {gap:.1f}%)"
        head = f"Baseline ({summary['loader']}, {summary['storage']}, {e['workers']} workers): "
        lines.append(head + body + ".")
        if e["flagged"]:
            lines.append(
                f"\n> **WARNING: unsteady run** ({e['workers']} workers): {e['why']} (limit "
                f"{100 * summary['threshold']:.0f}%). The machine's speed changed while the loaders were "
                "measured; their ratios are not trustworthy. Rerun on a quiet machine."
            )
    return "\n".join(lines) + "\n"
