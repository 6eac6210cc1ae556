"""One bench run: every variant measured in its own process, remote ones against the local endpoint.

The datasets are built (or reused) first; with remote storage in the plan, the local S3 endpoint
(rig.endpoint: moto's server on 127.0.0.1, with `--net` the shaping proxy in front, in this process)
starts, the datasets are copied to it, and it is stopped when the run ends, however it ends. GETs are
counted at the server. The ratios are set when every variant has run: their base is the mean of the
baseline's first and last passes (bench.baseline).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.baseline import add_ratios, summarise
from bench.cpu import ENDPOINT_PIDS_ENV
from bench.datasets import ensure_dataset, train_shards, upload
from bench.tables import add_local_ratios
from bench.variants import Variant, plan
from feedrate import network
from feedrate.progress import progress
from rig.endpoint import LocalEndpoint, local_endpoint

BUCKET = "feedrate-bench"
REPO = Path(__file__).resolve().parents[1]


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def run_variant(v: Variant, data: str, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    """One variant in a fresh process (bench.measure): its JSON result, or {"skipped": why}."""
    cmd = [
        sys.executable,
        "-m",
        "bench.measure",
        "--loader",
        v.loader,
        "--data",
        data,
        "--workers",
        str(v.workers),
        "--batch-size",
        str(args.batch_size),
        "--samples",
        str(args.samples),
        "--repeats",
        str(args.repeats),
        "--warmup",
        str(args.warmup),
        "--device",
        v.device,
    ]
    try:
        done = subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"skipped": f"did not finish within {args.timeout} s"}
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        return {"skipped": f"failed: {lines[-1] if lines else f'exit {done.returncode}'}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def sweep(args: argparse.Namespace) -> dict[str, Any]:
    """Every variant of `args` measured (or skipped, with why): the bench JSON document."""
    from training.results import git_state, library_versions, machine

    cuda = _cuda_available()
    data_dir = Path(args.data_dir)
    formats_needed = sorted(set(args.formats) | {"raw"})  # batch readers use any dataset's batches
    for fmt in progress(formats_needed, desc="datasets"):
        ensure_dataset(data_dir / fmt, fmt, args.train_size, max(1_000, args.train_size // 10))

    env = {**os.environ, "PYTHONPATH": str(REPO), "CI": os.environ.get("CI", "")}
    env.pop(network.NET_ENV, None)  # the loaders measure the link; they are not told the preset
    with contextlib.ExitStack() as stack:
        local: LocalEndpoint | None = None
        if any(s != "local" for s in args.storage):
            shaped = "thread" if args.net else ""  # in this process: re-shaped per variant
            local = stack.enter_context(local_endpoint(BUCKET, Path(args.out), proxy=shaped))
            env = local.environ(env)
            with local.direct():  # straight to the server: set-up, not measured
                for fmt in formats_needed:
                    upload(data_dir / fmt, f"s3://{BUCKET}/{fmt}")
        results: list[dict[str, Any]] = []
        variants = plan(args, cuda)
        for variant, reason in progress(variants, desc="variants"):
            fmt = "raw" if variant.encoding == "batches" else variant.encoding
            data = (
                str(data_dir / fmt) if variant.storage == "local" else f"{variant.storage}://{BUCKET}/{fmt}"
            )
            row: dict[str, Any] = {
                "loader": variant.loader,
                "storage": variant.storage,
                "encoding": variant.encoding,
                "workers": variant.workers,
                "device": variant.device,
                "batch_size": args.batch_size,
            }
            if variant.net:
                row["net"] = variant.net
            if variant.baseline_pass:
                row["baseline_pass"] = variant.baseline_pass
            if reason is None:
                server = local.server if local else None
                before = server.requests("GET", f"/{BUCKET}/") if server else []
                run_env = env
                if local and local.proxy and variant.net not in ("", "loopback"):
                    local.proxy.link = network.preset(variant.net)
                if local is not None and variant.storage != "local":
                    # The emulated endpoint (moto's server; the shaping proxy's threads in this process)
                    # shares the CPUs with the loader: the variant reports its share over the timed passes
                    run_env = {**env, ENDPOINT_PIDS_ENV: ",".join(map(str, local.pids()))}
                outcome = run_variant(variant, data, args, run_env)
                gets = server.requests("GET", f"/{BUCKET}/")[len(before) :] if server else None
                if variant.storage == "local":
                    gets = None
            else:
                outcome, gets = {"skipped": reason}, None
            if "skipped" in outcome:
                row["skipped"] = outcome["skipped"]
                results.append(row)
                print(f"skipped {variant.name}: {outcome['skipped']}", file=sys.stderr)
                continue
            row.update(
                samples=outcome["samples"],
                seconds=round(outcome["seconds"], 6),
                img_per_s=round(outcome["img_per_s"], 1),
                repeats_img_per_s=[round(r, 1) for r in outcome["repeats_img_per_s"]],
                cpu_us_per_img=round(outcome["cpu_us_per_img"], 1),
                stages_cpu_us_per_img=outcome.get("stages_cpu_us_per_img"),
                stages_wall_us_per_img=outcome.get("stages_wall_us_per_img"),
                decode_device=outcome["decode_device"],
                setup_s=round(outcome["setup_s"], 3),
                stats=outcome["stats"],
            )
            if outcome.get("prefetch_plan"):
                row["prefetch_plan"] = outcome["prefetch_plan"]
            if outcome.get("endpoint_cpu_share") is not None:
                row["endpoint_cpu_share"] = outcome["endpoint_cpu_share"]
            if gets is not None:
                row["server_gets"] = len(gets)
            if gets is not None and variant.encoding != "batches":
                # Shard GETs (not manifest or index reads) per shard per epoch begun.
                shard_gets = sum(1 for g in gets if g.split("?")[0].endswith(".tar"))
                consumed = args.warmup * args.batch_size + outcome["samples"] * args.repeats
                epochs = math.ceil(consumed / args.train_size)
                shards = train_shards(data_dir / fmt)
                row["shard_gets"] = shard_gets
                row["gets_per_shard_epoch"] = round(shard_gets / (shards * epochs), 3)
                # the wds readers read ahead into the epoch after the last one begun: its shards may
                # have been fetched too (never a shard twice within an epoch: tests/test_wds_loader.py)
                ahead = variant.loader == "wds" and variant.storage != "local"
                row["shard_gets_bound"] = shards * (epochs + int(ahead))
            results.append(row)
    baseline = summarise(results)
    add_ratios(results, baseline)
    add_local_ratios(results)
    return {
        "machine": {**machine(), "libraries": library_versions(), "cuda": cuda},
        "code": git_state(Path(__file__).resolve().parent.parent),  # which commit these figures are of
        "baseline": baseline,
        "config": {
            "samples": args.samples,
            "train_size": args.train_size,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "warmup_batches": args.warmup,
            "augmentation": "random crop 32 (pad 4), horizontal flip, normalise",
            "dataset": "synthetic",
            "peers": bool(args.peers and "local" in args.storage),
            "networks": {name: network.preset(name).as_dict() for name in args.net},
        },
        "results": results,
    }
