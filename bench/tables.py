"""The bench's results as tables: every variant side by side, and remote / local throughput per network."""

from __future__ import annotations

from typing import Any


def table(results: list[dict[str, Any]]) -> str:
    """Every row, measured or skipped, as a Markdown table."""
    head = (
        "| loader | storage | network | encoding | workers | device | img/s | × baseline | × local "
        "| set-up s | prefetch | GETs/shard/epoch | endpoint CPU |\n"
    )
    head += "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n"
    rows = []
    for r in results:
        where = f"| {r['loader']} | {r['storage']} | {r.get('net') or ''} | {r['encoding']} "
        where += f"| {r['workers']} | {r['device']} "
        if "skipped" in r:
            rows.append(where + f"| skipped: {r['skipped']} | | | | | | |")
            continue
        ratio = "" if r["ratio_to_baseline"] is None else f"{r['ratio_to_baseline']:.2f}"
        local = r.get("ratio_to_local")
        gets = r.get("gets_per_shard_epoch")
        rows.append(
            where + f"| {r['img_per_s']:,.0f} | {ratio} | {'' if local is None else f'{local:.2f}'} "
            f"| {r.get('setup_s', 0):.2f} | {_prefetch(r.get('prefetch_plan'), r.get('stats', {}))} "
            f"| {'' if gets is None else f'{gets:.2f}'} "
            f"| {_percent(r.get('endpoint_cpu_share'))} |"
        )
    return head + "\n".join(rows) + "\n"


def _percent(share: float | None) -> str:
    return "" if share is None else f"{100 * share:.0f}%"


def _prefetch(plan: dict[str, Any] | None, stats: dict[str, Any]) -> str:
    """A plan in a few characters: wds readers' depth ("d3"; "d1→4" when the readers re-planned it
    from their own shard GETs), or GETs at once for an up-front copy ("c8")."""
    if not plan or plan.get("source") == "local":
        return ""
    if "depth" in plan:
        readers = plan.get("readers") or 1
        now = stats.get("prefetch_depth", 0) / readers
        return f"d{plan['depth']}" + (f"→{now:.3g}" if now and now != plan["depth"] else "")
    return f"c{plan.get('concurrency', '')}"


def add_local_ratios(results: list[dict[str, Any]]) -> None:
    """`ratio_to_local` on every measured remote row: its img/s over the same loader's on local disk
    (same encoding, workers and device, same run)."""
    local = {
        (r["loader"], r["encoding"], r["workers"], r["device"]): r["img_per_s"]
        for r in results
        if r["storage"] == "local" and "skipped" not in r
    }
    for r in results:
        if r["storage"] != "local" and "skipped" not in r:
            base = local.get((r["loader"], r["encoding"], r["workers"], r["device"]))
            r["ratio_to_local"] = round(r["img_per_s"] / base, 3) if base else None


def net_table(results: list[dict[str, Any]]) -> str:
    """Remote / local throughput per loader variant (rows) and network (columns), set-up time beside."""
    measured = [r for r in results if r["storage"] != "local" and r.get("ratio_to_local") is not None]
    nets = list(dict.fromkeys(r["net"] for r in measured))
    if not nets:
        return ""
    keys = list(
        dict.fromkeys((r["loader"], r["storage"], r["encoding"], r["workers"], r["device"]) for r in measured)
    )
    cell = {
        (r["loader"], r["storage"], r["encoding"], r["workers"], r["device"], r["net"]): r for r in measured
    }
    head = "| loader | storage | encoding | workers | device | " + " | ".join(nets) + " |\n"
    head += "|---|---|---|---|---|" + "---:|" * len(nets) + "\n"
    rows = []
    for key in keys:
        cells = []
        for net in nets:
            r = cell.get((*key, net))
            cpu = r.get("endpoint_cpu_share") if r else None
            cpu_text = "" if cpu is None else f", endpoint {_percent(cpu)} CPU"
            cells.append("" if r is None else f"{r['ratio_to_local']:.2f} ({r['setup_s']:.1f} s{cpu_text})")
        rows.append("| " + " | ".join(map(str, key)) + " | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"
