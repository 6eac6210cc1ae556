"""`make bench`: loader-only throughput of every variant, side by side, in one run.

Variants are loader x storage x encoding x workers (x network for remote storage). The torchvision
loader on local disk with the same workers, measured in the same run, is the baseline of every ratio.
Remote variants read `s3://` and `cos://` URLs from a local S3 endpoint (moto's server on 127.0.0.1)
that the bench starts and stops itself; GET requests are counted at that server (GETs/shard/epoch:
shard GETs over shards x epochs begun; remote wds readers may also have read ahead into the next
epoch, so up to one epoch more shows).

`--net PRESET[,PRESET...]` (`make bench NET=same-region`; `all` for every preset): remote variants then
read through the shaping proxy (rig.netproxy) set to each preset in turn -- first-byte latency,
jitter, per-connection and shared bandwidth of a real object store -- and each remote row gets its
ratio to the same loader on local disk (`ratio_to_local`). The loaders are not told the preset: they
plan their prefetching from what they measure (their choice is in each row's `prefetch_plan`). Without
`--net`, remote variants talk to the endpoint directly (network "loopback").

Each variant runs in a fresh process (`bench.measure`); one that cannot run here (a GPU-only variant
without a GPU, a missing package) is listed as skipped with its reason.

Writes results/bench/bench.json (DESIGN.md's fields, plus details) and results/bench/bench.md, and
prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.measure import ENDPOINT_PIDS_ENV
from feedrate import network
from feedrate.errors import FeedrateError, run_cli
from feedrate.manifest import ENCODINGS, MANIFEST_NAME, Manifest
from feedrate.progress import progress
from loaders import BACKENDS
from rig import locals3

LOADERS = tuple(BACKENDS)
STORAGES = ("local", "s3", "cos")
# Loaders that read the CIFAR python batches rather than the shards: encoding does not apply.
BATCH_READERS = ("torchvision", "tensor")
BUCKET = "feedrate-bench"
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Variant:
    loader: str
    storage: str
    encoding: str  # jpg | png | raw, or "batches" for the loaders that read the python batches
    workers: int
    device: str  # cpu | cuda
    net: str = ""  # remote storage: the network preset read through ("loopback": unshaped); local: ""

    @property
    def name(self) -> str:
        net = f"/{self.net}" if self.net else ""
        return f"{self.loader}/{self.storage}{net}/{self.encoding}/w{self.workers}/{self.device}"


def _csv(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise FeedrateError(f"unknown {what} {', '.join(bad) or '(none)'}; accepted: {', '.join(allowed)}")
    return items


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def ensure_dataset(root: Path, fmt: str, train: int, test: int) -> None:
    """A synthetic dataset of `train` samples in `fmt` at `root`, reused when it already matches."""
    from shardgen import ShardgenConfig, build

    manifest_path = root / MANIFEST_NAME
    if manifest_path.exists():
        manifest = Manifest.from_json(manifest_path.read_text())
        if manifest.encoding == fmt and manifest.splits["train"].samples == train:
            return
    build(
        ShardgenConfig(
            dest=str(root),
            source="synthetic",
            fmt=fmt,
            synthetic_train=train,
            synthetic_test=test,
            overwrite=True,
            allow_download=False,
        )
    )


def upload(root: Path, url: str) -> None:
    from feedrate.storage import open_store

    store = open_store(url)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    for path in files:
        store.put_file(path, path.relative_to(root).as_posix())
    store.put_file(root / MANIFEST_NAME, MANIFEST_NAME)  # last, as shardgen does


def plan(args: argparse.Namespace, cuda: bool) -> list[tuple[Variant, str | None]]:
    """Every requested variant, with the reason it cannot run here (or None)."""
    variants: list[tuple[Variant, str | None]] = []
    devices = ["cuda", "cpu"] if cuda else ["cpu"]
    for workers in args.workers:
        for loader in args.loaders:
            for storage in args.storage:
                nets = [""] if storage == "local" else (args.net or ["loopback"])
                encodings = ["batches"] if loader in BATCH_READERS else args.formats
                for net in nets:
                    for encoding in encodings:
                        for device in devices:
                            variants.append((Variant(loader, storage, encoding, workers, device, net), None))
                        if loader == "dali" and not cuda:
                            reason = "DALI mixed (nvJPEG) decode needs a CUDA GPU; none on this machine"
                            v = Variant(loader, storage, encoding, workers, "cuda", net)
                            variants.append((v, reason))
    # The baseline first: every ratio needs it.
    variants.sort(key=lambda v: (v[0].loader != "torchvision" or v[0].storage != "local", v[0].workers))
    return variants


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used so far (Linux /proc; 0 where unreadable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_variant(v: Variant, data: str, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
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


def table(results: list[dict[str, Any]]) -> str:
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


def bench(args: argparse.Namespace) -> dict[str, Any]:
    from training.results import library_versions, machine

    cuda = _cuda_available()
    data_dir = Path(args.data_dir)
    formats_needed = sorted(set(args.formats) | {"raw"})  # batch readers use any dataset's batches
    for fmt in progress(formats_needed, desc="datasets"):
        ensure_dataset(data_dir / fmt, fmt, args.train_size, max(1_000, args.train_size // 10))

    env = {**os.environ, "PYTHONPATH": str(REPO), "CI": os.environ.get("CI", "")}
    server = proxy = None
    remote = [s for s in args.storage if s != "local"]
    if remote:
        server = locals3.start(log_path=Path(args.out) / "moto.log")
        env.update(server.env())
        env["AWS_EC2_METADATA_DISABLED"] = "true"
        env.pop(network.NET_ENV, None)  # the loaders measure the link; they are not told the preset
        locals3.create_bucket(server.endpoint, BUCKET)
        os.environ.update(server.env())
        for fmt in formats_needed:
            upload(data_dir / fmt, f"s3://{BUCKET}/{fmt}")  # straight to the server: set-up, not measured
        if args.net:
            from rig.netproxy import NetProxy

            proxy = NetProxy(server.endpoint, seed=0, record=False).start()
    try:
        results: list[dict[str, Any]] = []
        baseline: dict[int, float] = {}
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
            if reason is None:
                before = server.requests("GET", f"/{BUCKET}/") if server else []
                run_env = env
                if proxy is not None and variant.net not in ("", "loopback"):
                    proxy.link = network.preset(variant.net)
                    run_env = {**env, "AWS_ENDPOINT_URL": proxy.endpoint, "COS_ENDPOINT": proxy.endpoint}
                if server is not None and variant.storage != "local":
                    # The emulated endpoint (moto's server; the shaping proxy's threads in this process)
                    # shares the CPUs with the loader: the variant reports its share over the timed passes
                    run_env = {**run_env, ENDPOINT_PIDS_ENV: f"{server.pid},{os.getpid()}"}
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
                decode_device=outcome["decode_device"],
                setup_s=round(outcome["setup_s"], 3),
                stats=outcome["stats"],
            )
            if outcome.get("prefetch_plan"):
                row["prefetch_plan"] = outcome["prefetch_plan"]
            if outcome.get("endpoint_cpu_share") is not None:
                row["endpoint_cpu_share"] = outcome["endpoint_cpu_share"]
            if variant.loader == "torchvision" and variant.storage == "local":
                baseline[variant.workers] = outcome["img_per_s"]
            base = baseline.get(variant.workers)
            row["ratio_to_baseline"] = round(outcome["img_per_s"] / base, 3) if base else None
            if gets is not None:
                row["server_gets"] = len(gets)
            if gets is not None and variant.encoding != "batches":
                # Shard GETs (not manifest or index reads) per shard per epoch begun.
                shard_gets = sum(1 for g in gets if g.split("?")[0].endswith(".tar"))
                consumed = args.warmup * args.batch_size + outcome["samples"] * args.repeats
                epochs = math.ceil(consumed / args.train_size)
                shards = _train_shards(data_dir / fmt)
                row["shard_gets"] = shard_gets
                row["gets_per_shard_epoch"] = round(shard_gets / (shards * epochs), 3)
                # the wds readers read ahead into the epoch after the last one begun: its shards may
                # have been fetched too (never a shard twice within an epoch: tests/test_wds_loader.py)
                ahead = variant.loader == "wds" and variant.storage != "local"
                row["shard_gets_bound"] = shards * (epochs + int(ahead))
            results.append(row)
    finally:
        if proxy is not None:
            proxy.close()
        if server:
            locals3.stop(server.pid)
    add_local_ratios(results)
    return {
        "machine": {**machine(), "libraries": library_versions(), "cuda": cuda},
        "config": {
            "samples": args.samples,
            "train_size": args.train_size,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "warmup_batches": args.warmup,
            "augmentation": "random crop 32 (pad 4), horizontal flip, normalise",
            "dataset": "synthetic",
            "networks": {name: network.preset(name).as_dict() for name in args.net},
        },
        "results": results,
    }


def _train_shards(root: Path) -> int:
    manifest = Manifest.from_json((root / MANIFEST_NAME).read_text())
    return len(manifest.splits["train"].shards)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench", description="Loader-only throughput of every variant.")
    p.add_argument("--loaders", default=",".join(LOADERS), help="comma-separated (default: all)")
    p.add_argument("--storage", default=",".join(STORAGES), help="comma-separated: local,s3,cos")
    p.add_argument("--formats", default=",".join(ENCODINGS), help="comma-separated: jpg,png,raw")
    p.add_argument("--workers", default="2", help="comma-separated worker counts (default: 2)")
    p.add_argument(
        "--net",
        default="",
        help="network presets for remote storage, comma-separated or 'all' (default: none, unshaped): "
        + ", ".join(n for n in network.PRESETS if n != "loopback"),
    )
    p.add_argument("--samples", type=int, default=20_000, help="images per timed pass")
    p.add_argument("--train-size", type=int, default=20_000, help="samples in each bench dataset")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timed passes per variant; the median counts")
    p.add_argument("--warmup", type=int, default=5, help="batches before timing")
    p.add_argument("--timeout", type=int, default=600, help="seconds per variant")
    p.add_argument("--data-dir", default="data/bench")
    p.add_argument("--out", default="results/bench")
    return p


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)

    def body() -> None:
        args.loaders = _csv(args.loaders, LOADERS, "loader")
        args.storage = _csv(args.storage, STORAGES, "storage")
        args.formats = _csv(args.formats, ENCODINGS, "format")
        shaped = tuple(n for n in network.PRESETS if n != "loopback")
        args.net = (
            list(shaped)
            if args.net == "all"
            else _csv(args.net, shaped, "network preset")
            if args.net
            else []
        )
        if args.net and args.storage == ["local"]:
            raise FeedrateError("--net shapes remote storage; add s3 or cos to --storage")
        try:
            args.workers = [int(w) for w in args.workers.split(",")]
        except ValueError:
            raise FeedrateError(f"--workers {args.workers!r}: expected comma-separated integers") from None
        for name in ("samples", "train_size", "batch_size", "repeats"):
            if getattr(args, name) < 1:
                raise FeedrateError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        document = bench(args)
        document["config"]["wall_s"] = round(time.perf_counter() - started, 1)
        text = table(document["results"])
        by_net = net_table(document["results"])
        if by_net:
            text += (
                "\n## Remote / local throughput per network (set-up time incl. any up-front copy; the share "
                "of the CPUs the emulated endpoint - S3 server and shaping proxy - took meanwhile)\n\n"
                + "".join(f"- {network.preset(n).describe()}\n" for n in args.net)
                + "\n"
                + by_net
            )
        tmp = out / ".bench.json.tmp"
        tmp.write_text(json.dumps(document, indent=2) + "\n")
        tmp.replace(out / "bench.json")
        (out / "bench.md").write_text(
            "# Loader-only throughput\n\n"
            f"{document['machine'].get('cpu_count')} CPUs, batch {args.batch_size}, "
            f"{args.samples} images per pass, median of {args.repeats}; ratios to the torchvision "
            "baseline (local, same workers) measured in this run.\n\n" + text
        )
        print(text)
        print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")

    run_cli("bench", body)


if __name__ == "__main__":
    main()
