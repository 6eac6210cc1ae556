"""What run.json says about a run, and the lines train.py prints when it ends.

run.json is a result's provenance: the resolved config (no secrets: URLs redacted, no
environment), the dataset, the device, library versions, the git commit, the machine, the downloads,
under torchrun the ranks and how each split was shared out, and per epoch the job's figures (img/s,
data-wait fraction, AU) with each rank's own beside them. `describe` builds its fixed part once the
loaders exist; train.py adds the epochs (`phase`), counters and summary as the run goes, and rewrites
the file atomically (training.results.write_json_atomic).
"""

from __future__ import annotations

import datetime as dt
import socket
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

import loaders
from feedrate.manifest import Manifest
from feedrate.storage import redact_url
from training import results
from training.distributed import Group, SplitPlan
from training.models import Stepper, peak_lr
from training.stages import per_rank, phase_stages, verdict_text
from training.timing import EpochStats, across_ranks

REPO = Path(__file__).resolve().parents[1]
DROP_POLICY = (
    "drop: every rank runs the fewest training batches any rank has; validation runs each rank's whole part"
)


def now() -> str:
    """The current UTC time as run.json writes it (ISO 8601, seconds)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def describe(
    config: Mapping[str, Any],
    out: Path,
    manifest: Manifest,
    stepper: Stepper,
    made: Mapping[str, loaders.Loader],
    plans: Mapping[str, SplitPlan],
    group: Group,
    ranks: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """run.json's fixed part, status "running" and no epoch yet.

    `config`: train.py's resolved settings as a dict (dataclasses.asdict); `plans`: each split's share-out
    (this rank's batches are the planned ones); `ranks`: every rank's host, device and threads.
    """
    global_batch = config["batch_size"] * group.world_size
    head = {
        "status": "running",
        "started": now(),
        "csv": results.CSV_NAME,
        "config": dict(config)
        | {
            "data": redact_url(config["data"]),
            "endpoint_url": redact_url(config["endpoint_url"]) if config["endpoint_url"] else None,
            "out": str(out),
            "peak_lr": None if config["emulate"] else peak_lr(config["lr"], global_batch),
            "planned_batches": {split: p.batches[group.rank] for split, p in plans.items()},
        },
        "dataset": {"kind": manifest.kind, "encoding": manifest.encoding, "source": manifest.source}
        | {f"{split}_samples": manifest.splits[split].samples for split in made},
    }
    process = process_record(config, stepper, made, plans, group, ranks)
    used = {
        "name": config["loader"],
        "decode_device": made["train"].decode_device,
        "prefetch_plan": made["train"].prefetch_plan,
        # False: the data were not checked against the manifest's sha256 (--no-verify)
        "verify": all(loader.verify for loader in made.values()),
    }
    return head | {"device": process.pop("device"), "loader": used} | process | {"epochs": []}


def process_record(
    config: Mapping[str, Any],
    stepper: Stepper,
    made: Mapping[str, loaders.Loader],
    plans: Mapping[str, SplitPlan],
    group: Group,
    ranks: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """What one process of a run (the first, or a resumed one: run.json's `resumed[]` entries) ran on:
    device, library versions, git commit, machine, its downloads and, under torchrun, how the splits
    were shared out and where each rank ran. A resumed process records its own: --device, the machine,
    the code and the world size may all differ from the first process's."""
    global_batch = config["batch_size"] * group.world_size
    return {
        "device": {
            "type": stepper.device.type,
            "name": results.device_name(stepper.device),
            "amp": str(stepper.amp_dtype).removeprefix("torch.") if stepper.amp_dtype else None,
            "channels_last": stepper.channels_last,
            "torch_threads": torch.get_num_threads(),
            "emulated_img_per_s": config["emulate"],
        },
        "versions": results.library_versions(),
        "git": results.git_state(REPO),
        "machine": results.machine(),
        "downloads": [asdict(d) for loader in made.values() for d in loader.downloads],
        "distributed": None
        if not group.distributed
        else {
            "world_size": group.world_size,
            "backend": group.backend,
            "global_batch_size": global_batch,
            "policy": DROP_POLICY,
            "splits": {split: p.as_dict() for split, p in plans.items()},
            "ranks": list(ranks),
            "rank_counters": None,
        },
    }


def rank_info(group: Group, device: torch.device) -> dict[str, Any]:
    """This rank's entry in run.json's `distributed.ranks`: where it ran and with how many threads."""
    return {
        "rank": group.rank,
        "local_rank": group.topology.local_rank,
        "host": socket.gethostname(),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }


def phase(
    ranks: Sequence[EpochStats], accuracy: tuple[float | None, float | None], workers: int = 0
) -> dict[str, Any]:
    """An epoch's `train` or `val` entry: the job's figures, accuracy, the data path's stages, verdict and
    what-if figures (training.stages; `workers`: readers per rank), and each rank's own (several ranks)."""
    own = {"ranks": [r.as_dict() | per_rank(r, workers) for r in ranks]} if len(ranks) > 1 else {}
    job = across_ranks(ranks) | {"top1": accuracy[0], "top5": accuracy[1]}
    return job | phase_stages(ranks, workers) | own


def pct(x: float | None) -> str:
    """A fraction as a percentage with one decimal, or `n/a`."""
    return "n/a" if x is None else f"{100 * x:.1f}%"


def summary_lines(out: Path, doc: Mapping[str, Any], status: str) -> list[str]:
    """The lines that end a run's output: where the results are, the training rate, data wait, AU and
    the last validation top-1, the last training epoch's verdict with its what-if figures (when it has
    one), and how many bad samples were skipped (if any)."""
    lines = [f"{status}; results in {out / results.CSV_NAME} (run.json beside it)"]
    s, epochs = doc["summary"], doc["epochs"]
    if not epochs:
        return [*lines, "no epoch completed; the CSV holds the batches that did"]
    rate = "n/a" if s["img_per_s"] is None else f"{s['img_per_s']:.1f} img/s"
    top1 = epochs[-1]["val"]["top1"] if epochs[-1]["val"] else None
    lines.append(
        f"training {rate}, data wait {pct(s['data_wait_fraction'])}, AU {pct(s['au'])}, "
        f"val top-1 {'n/a' if top1 is None else f'{top1:.3f}'}"
    )
    trained = epochs[-1].get("train") or {}
    verdict = verdict_text(trained)
    if verdict:
        lines.append(f"{verdict}: {_what_if_text(trained)}")
    skipped = sum(int(c.get("skipped", 0)) for c in (doc.get("counters") or {}).values())
    if skipped:
        lines.append(f"{skipped} bad samples skipped (--skip-bad; counters in run.json)")
    return lines


def _what_if_text(record: Mapping[str, Any]) -> str:
    """The verdict's second half: the readers' feed rate and the what-if figures, or why there are none."""
    w = record.get("what_if")
    if not w:
        return "the loader reports no stage times"

    def rate(x: float | None) -> str:
        return "n/a" if x is None else f"{x:,.0f}"

    return (
        f"readers feed {rate(w['feed_img_per_s'])} img/s; cached {rate(w['cached']['img_per_s'])}, "
        f"2x readers {rate(w['twice_readers']['img_per_s'])}; "
        f"AU < 90% above {rate(w['au90_accelerator']['img_per_s'])} img/s (run.json what_if)"
    )
