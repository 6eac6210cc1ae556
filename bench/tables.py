"""The bench's results as tables: every variant side by side, feedrate's loaders against their peers, and
remote / local throughput per network."""

from __future__ import annotations

from typing import Any

from bench.peers import MEASURES, PEERS, is_peer
from loaders.stagetimes import STAGES

# A stage's initials in the compact column: storage, decode, augment, transfer, queue
STAGE_SHORT = {"storage": "st", "decode": "de", "augment": "au", "transfer": "tr", "queue": "q"}


def table(results: list[dict[str, Any]]) -> str:
    """Every row, measured or skipped, as a Markdown table."""
    head = (
        "| loader | storage | network | encoding | workers | device | img/s | × baseline | × local "
        "| CPU µs/img | stage CPU µs/img | set-up s | prefetch | GETs/shard/epoch | endpoint CPU |\n"
    )
    head += "|---|---|---|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|\n"
    rows = []
    for r in results:
        loader = r["loader"] + (f" ({r['baseline_pass']})" if r.get("baseline_pass") else "")
        where = f"| {loader} | {r['storage']} | {r.get('net') or ''} | {r['encoding']} "
        where += f"| {r['workers']} | {r['device']} "
        if "skipped" in r:
            rows.append(where + f"| skipped: {r['skipped']} | | | | | | | | |")
            continue
        ratio = "" if r["ratio_to_baseline"] is None else f"{r['ratio_to_baseline']:.2f}"
        local = r.get("ratio_to_local")
        gets = r.get("gets_per_shard_epoch")
        rows.append(
            where + f"| {r['img_per_s']:,.0f} | {ratio} | {'' if local is None else f'{local:.2f}'} "
            f"| {r['cpu_us_per_img']:,.0f} | {stage_cell(r.get('stages_cpu_us_per_img'))} "
            f"| {r.get('setup_s', 0):.2f} "
            f"| {_prefetch(r.get('prefetch_plan'), r.get('stats', {}))} "
            f"| {'' if gets is None else f'{gets:.2f}'} "
            f"| {_percent(r.get('endpoint_cpu_share'))} |"
        )
    return head + "\n".join(rows) + "\n"


def stage_cell(stages: dict[str, float] | None) -> str:
    """A row's CPU µs/img per stage in one cell, `st 8.1 · de 2.0 · au 9.3 · tr 0.1 · q 0.0` (the
    loader's own stage counters, loaders.stagetimes); a stage it cannot separate is left out, and a
    loader reporting none gets an empty cell."""
    if not stages:
        return ""
    return " · ".join(f"{STAGE_SHORT[s]} {stages[s]:.1f}" for s in STAGES if s in stages)


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
    (same encoding, workers and device, same run; the baseline's two passes: their mean)."""
    passes: dict[tuple[str, str, int, str], list[float]] = {}
    for r in results:
        if r["storage"] == "local" and "skipped" not in r:
            key = (r["loader"], r["encoding"], r["workers"], r["device"])
            passes.setdefault(key, []).append(r["img_per_s"])
    local = {key: sum(v) / len(v) for key, v in passes.items()}
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


def peer_table(results: list[dict[str, Any]]) -> str:
    """Per encoding and worker count, each feedrate loader over its peer (wds / peer:webdataset, dali /
    peer:dali-plain), and whether the fastest feedrate loader reading those shards leads every peer that
    ran. Local CPU rows only: the peers read local shards on the CPU. Empty without peer rows."""
    rows_of = [r for r in results if r["storage"] == "local" and r["device"] == "cpu" and "skipped" not in r]
    keys = list(dict.fromkeys((r["encoding"], r["workers"]) for r in rows_of if is_peer(r["loader"])))
    if not keys:
        return ""
    head = "| encoding | workers | " + " | ".join(f"{MEASURES[p]} / {p}" for p in PEERS)
    head += " | fastest feedrate loader | leads every peer |\n"
    head += "|---|---|" + "---:|" * len(PEERS) + "---|---|\n"
    lines = []
    for encoding, workers in keys:
        here = {r["loader"]: r for r in rows_of if (r["encoding"], r["workers"]) == (encoding, workers)}
        cells = []
        for peer in PEERS:
            ours, theirs = here.get(MEASURES[peer]), here.get(peer)
            cells.append(f"{ours['img_per_s'] / theirs['img_per_s']:.2f}" if ours and theirs else "")
        feedrate = [r for name, r in here.items() if not is_peer(name)]
        peers = [r for name, r in here.items() if is_peer(name)]
        if feedrate:
            best = max(feedrate, key=lambda r: r["img_per_s"])
            rival = max(peers, key=lambda r: r["img_per_s"])
            verdict = "yes" if best["img_per_s"] > rival["img_per_s"] else f"no: {rival['loader']} is faster"
            missing = [p for p in PEERS if p not in here]
            verdict += f" (not measured: {', '.join(missing)})" if missing else ""
            cells += [f"{best['loader']} ({best['img_per_s']:,.0f} img/s)", verdict]
        else:
            cells += ["(none measured)", ""]
        lines.append(f"| {encoding} | {workers} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"
