"""The data side of a run's set-up: the dataset checked, the output directory chosen, the loaders built.

Everything here can fail on bad input (a missing dataset, an empty split, a taken --out, a loader that
cannot reach its store), so it all happens before anything is written: a run that fails here leaves no
results directory behind. Loaders that fetch their split up front (the torchvision baseline, the tensor
loader, DALI on a remote root) do it while they are built, so this is also where a run spends its
download time (CSV rows 10 and 11; a resumed run's are in its run.json `resumed` entry instead).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch

import loaders
from feedrate.errors import FeedrateError
from feedrate.manifest import SPLITS, Manifest, load_manifest
from feedrate.storage import open_store, redact_url
from loaders.resume import check
from training.checkpoint import check_unchanged, dataset_digest
from training.distributed import Group, Topology
from training.output import output_dir
from training.runstate import Resume, restartable


class DataSettings(Protocol):
    """The part of train.py's config that the set-up reads (train.TrainConfig has it all)."""

    loader: str
    data: str
    batch_size: int
    epochs: int
    workers: int
    seed: int
    endpoint_url: str | None
    cache_dir: str | None
    skip_bad: bool
    net: str
    verify: bool
    out: Path | None
    overwrite: bool
    resume: bool
    checkpoint_dir: Path | None
    checkpoint_every: int | None


def make_loaders(
    cfg: DataSettings, device: torch.device, topology: Topology | None = None
) -> dict[str, loaders.Loader]:
    """The training and validation loaders, by split; under torchrun each serves this rank's part.

    When building one fails (or a signal stops it), those already built are closed before the error
    goes on, so none keeps worker processes or a temporary copy of its split.
    """
    topology = topology or Topology()
    if cfg.skip_bad and topology.world_size > 1:
        # A rank that skips samples runs short and would leave the others waiting in a collective.
        raise FeedrateError("--skip-bad works with one process only for now; run without torchrun")
    made: dict[str, loaders.Loader] = {}
    try:
        for split in SPLITS:
            lcfg = loaders.LoaderConfig(
                data=cfg.data,
                split=split,
                batch_size=cfg.batch_size,
                train=split == "train",
                workers=cfg.workers,
                device=str(device),
                seed=cfg.seed,
                endpoint_url=cfg.endpoint_url,
                cache_dir=cfg.cache_dir,
                rank=topology.rank,
                world_size=topology.world_size,
                last_epoch=cfg.epochs,  # train.py's epochs are 1..--epochs
                options=({"skip_bad": True} if cfg.skip_bad else {})
                | ({"net": cfg.net} if cfg.net else {})
                | ({} if cfg.verify else {"verify": False}),
            )
            made[split] = loaders.make_loader(cfg.loader, lcfg)
    except BaseException:
        close_loaders(made)
        raise
    return made


def close_loaders(made: Mapping[str, loaders.Loader]) -> None:
    """Stop the loaders' persistent workers and drop what they hold (temporary copies included)."""
    for loader in made.values():
        loader.close()


def prepare(
    cfg: DataSettings, group: Group, device: torch.device, resume: Resume | None = None
) -> tuple[Path | None, Manifest, dict[str, loaders.Loader]]:
    """(--out checked, not created; the manifest; the loaders), on every rank; rank 0 alone owns --out,
    the others get None for it.

    `resume`: the checkpoint a run continues (training.runstate): its output directory is the run's,
    and its dataset and train-loader state are checked against this manifest before any loader is built."""
    out = None
    if group.is_main:
        if resume is not None:
            out = Path(resume.meta["out"])
        else:
            out = output_dir(cfg.out, cfg.loader, cfg.overwrite or restartable(cfg, cfg.out))
    store = open_store(cfg.data, endpoint_url=cfg.endpoint_url)
    store.check_readable()
    manifest = load_manifest(store)
    for split in SPLITS:
        if split not in manifest.splits or manifest.splits[split].samples < 1:
            raise FeedrateError(f"split {split!r} of {redact_url(cfg.data)} is empty or missing")
    if resume is not None:
        where = resume.checkpoint.path
        saved = resume.meta["config"]
        check_unchanged(saved, {"dataset": dataset_digest(manifest.to_json())}, where)
        state = resume.meta["loader_state"]
        if state is not None:
            try:
                check(state, cfg.loader, "train", cfg.seed, manifest.splits["train"].samples)
            except FeedrateError as exc:
                raise FeedrateError(f"checkpoint {where}: {exc}") from None
    torch.manual_seed(cfg.seed)  # model initialisation and any loader that draws from torch's generator
    made = make_loaders(cfg, device, group.topology)
    if cfg.checkpoint_every is not None or (resume is not None and resume.meta["loader_state"] is not None):
        lacking = [split for split, loader in made.items() if not hasattr(loader, "load_state_dict")]
        if lacking:
            close_loaders(made)
            raise FeedrateError(
                f"the {cfg.loader} loader cannot say where it is in an epoch (no state_dict()), so it "
                "cannot checkpoint mid-epoch or resume; use --checkpoint-dir without --checkpoint-every"
            )
    return out, manifest, made
