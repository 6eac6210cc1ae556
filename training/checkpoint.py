"""Checkpoints of a training run on disk: written atomically, found, verified, and checked on resume.

A checkpoint is a directory `DIR/ckpt-<global step, 12 digits>/` holding two files:
- `tensors.pt`: everything that is a tensor (the model, the optimiser's momentum, the AMP scaler, torch's
  RNG states), written by `torch.save` and read back with `torch.load(weights_only=True)`, which builds
  tensors and plain containers only: a checkpoint is a file someone may hand you, and unpickling one must
  never run code from it;
- `meta.json`: the rest, as JSON -- where the run is (epoch, batches done in it, global step, phase), the
  loader state, the CSV offset, the run.json document so far, the settings a resume may not change, and
  the size and sha256 of `tensors.pt`, checked before it is read.

Writing (`save`): both files go to `DIR/.tmp-<step>-<random>/`, each fsynced, then the directory itself;
one `os.rename` gives it its final name (a directory rename is atomic) and DIR is fsynced. A process
killed at any point leaves either the complete checkpoint or a `.tmp-*` directory, which is never read
and is deleted by the next successful save, together with every checkpoint but the newest KEEP.
FEEDRATE_CHECKPOINT_TEST_PAUSE=S[@N] (a test seam, documented here and used by no run otherwise) sleeps S
seconds between the fsynced files and the rename (in saves of step N or later), so a test can SIGKILL a
save half-way.

Reading (`latest`): the newest `ckpt-*` whose files are whole -- meta.json parses, tensors.pt has the
size and sha256 it names -- is the one resumed from; a torn or damaged one is passed over with a note
(the older of the two kept is there for that). A whole checkpoint whose values are wrong (bad type, out
of range, another format version) is not passed over: that is an error naming the value, because it is
not a cut write but a file that was changed.

Only one process writes a DIR (rank 0 of one run); two runs sharing a DIR are not supported.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from feedrate.errors import FeedrateError
from feedrate.files import fsync_path, umask, write_synced

FORMAT = "feedrate-checkpoint"
VERSION = 1
TENSORS = "tensors.pt"
META = "meta.json"
KEEP = 2  # complete checkpoints kept: the newest, and one to fall back on if it is damaged
NAME = re.compile(r"ckpt-(\d{12})")
TMP_PREFIX = ".tmp-"
PAUSE_ENV = "FEEDRATE_CHECKPOINT_TEST_PAUSE"
META_MAX_BYTES = 32 << 20  # meta.json is read whole: a CIFAR run's is tens of KiB, a handed-in one may be any
PHASES = ("train", "val")  # train: mid-epoch (batches done, loader state); val: the epoch's training done

# The settings a run may not change when it resumes: flag -> the key in train.py's config (and in
# meta["config"]). `dataset` is the manifest's sha256 (`dataset_digest`): --data itself may move (a local
# copy of the same bucket) as long as it names the same data.
FROZEN = {
    "--loader": "loader",
    "--data": "dataset",
    "--seed": "seed",
    "--batch-size": "batch_size",
    "--arch": "arch",
    "--epochs": "epochs",
    "--lr": "lr",
    "--emulate": "emulate",
    "--no-amp": "amp",
}


def checkpoint_name(step: int) -> str:
    """`ckpt-000000001200`: the name sorts by step."""
    return f"ckpt-{step:012d}"


def dataset_digest(manifest_json: str) -> str:
    """The sha256 of a manifest's canonical JSON (feedrate.manifest.Manifest.to_json): the same data
    wherever it is stored; any change to a shard changes its recorded sha256, hence this."""
    return hashlib.sha256(manifest_json.encode()).hexdigest()


# -- writing --------------------------------------------------------------------------------------------
def save(directory: Path, step: int, tensors: Mapping[str, Any], meta: Mapping[str, Any]) -> Path:
    """Write checkpoint `step` into `directory` atomically (module docstring); its path.

    `meta` gets the format, version, step and the tensor file's size and sha256 added. A checkpoint of
    the same step already there is replaced (the older one kept stays complete meanwhile). After the
    rename, every checkpoint but the newest KEEP complete ones and every `.tmp-*` are deleted."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{step:012d}-", dir=directory))
        try:
            os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's 0700 would hide the checkpoint from the user's group
            buffer = io.BytesIO()
            torch.save(dict(tensors), buffer)
            data = buffer.getbuffer()
            write_synced(tmp / TENSORS, data)
            body = dict(meta) | {
                "format": FORMAT,
                "version": VERSION,
                "step": step,
                "tensors": {"file": TENSORS, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()},
            }
            del data
            write_synced(tmp / META, (json.dumps(body, default=str) + "\n").encode())
            fsync_path(tmp)
            _test_pause(step)  # a SIGKILL now leaves only the .tmp directory
            final = directory / checkpoint_name(step)
            aside = None
            if final.exists():
                aside = directory / f"{TMP_PREFIX}replaced-{final.name}-{os.getpid()}"
                os.rename(final, aside)
            os.rename(tmp, final)
            fsync_path(directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _rotate(directory)
    except OSError as exc:
        raise FeedrateError(f"cannot write a checkpoint in {directory}: {exc.strerror or exc}") from None
    return final


def _test_pause(step: int) -> None:
    """The test seam (module docstring): FEEDRATE_CHECKPOINT_TEST_PAUSE=S sleeps S seconds in every save,
    =S@N only in saves of step N or later (so that an earlier checkpoint is complete)."""
    text = os.environ.get(PAUSE_ENV, "").strip()
    if not text:
        return
    seconds, _, first = text.partition("@")
    try:
        if step >= int(first or 0):
            time.sleep(float(seconds))
    except ValueError:
        raise FeedrateError(f"{PAUSE_ENV}={text!r}; expected SECONDS or SECONDS@STEP") from None


def _rotate(directory: Path) -> None:
    """Delete every `.tmp-*` and every checkpoint but the newest KEEP that look complete."""
    kept = 0
    for path in checkpoints(directory):
        if kept < KEEP and _looks_complete(path):
            kept += 1
            continue
        shutil.rmtree(path, ignore_errors=True)
    for path in directory.iterdir():
        if path.name.startswith(TMP_PREFIX):
            shutil.rmtree(path, ignore_errors=True)


def _looks_complete(path: Path) -> bool:
    """The cheap half of `_whole`: meta.json parses and the tensor file has its size (no hashing)."""
    try:
        meta = _read_meta(path)
        return (path / TENSORS).stat().st_size == meta["tensors"]["bytes"]
    except (OSError, ValueError, KeyError, TypeError, FeedrateError):
        return False


# -- finding and reading --------------------------------------------------------------------------------
def checkpoints(directory: Path) -> list[Path]:
    """The `ckpt-*` directories in `directory`, newest (highest step) first; `.tmp-*` never."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if NAME.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: p.name, reverse=True)


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint: its directory and its validated metadata."""

    path: Path
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return self.meta["step"]

    def tensors(self) -> dict[str, Any]:
        """The tensor file, its sha256 checked again (it is read whole, once), loaded with
        `weights_only=True` onto the CPU."""
        target = self.path / TENSORS
        try:
            data = target.read_bytes()
        except OSError as exc:
            raise FeedrateError(f"checkpoint {self.path}: cannot read {TENSORS}: {exc.strerror}") from None
        want = self.meta["tensors"]
        if len(data) != want["bytes"] or hashlib.sha256(data).hexdigest() != want["sha256"]:
            raise FeedrateError(f"checkpoint {self.path}: {TENSORS} changed since it was found (sha256)")
        try:
            loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError for anything but tensors and plain containers
            reason = " ".join(str(exc).split())[:200]
            raise FeedrateError(f"checkpoint {self.path}: {TENSORS} is not a tensor file: {reason}") from None
        if not isinstance(loaded, dict):
            raise FeedrateError(f"checkpoint {self.path}: {TENSORS} holds a {type(loaded).__name__}")
        return loaded


class Oversized(FeedrateError):
    """A meta.json over META_MAX_BYTES: no cut write makes one (a cut file is shorter), so it is refused,
    not passed over."""


def _read_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's meta.json, parsed; never more than META_MAX_BYTES of it read (Oversized)."""
    with open(path / META, "rb") as f:
        data = f.read(META_MAX_BYTES + 1)
    if len(data) > META_MAX_BYTES:
        raise Oversized(
            f"checkpoint {path}: {META} is over {META_MAX_BYTES} bytes; a checkpoint's is far smaller "
            "(was it replaced?)"
        )
    return json.loads(data.decode("utf-8"))


def _whole(path: Path) -> dict[str, Any]:
    """meta.json of a checkpoint whose files are whole; a FeedrateError saying what is torn."""
    try:
        meta = _read_meta(path)
    except FileNotFoundError:
        raise FeedrateError(f"no {META}") from None
    except (OSError, ValueError) as exc:
        raise FeedrateError(f"{META} is unreadable or cut ({type(exc).__name__})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("tensors"), dict):
        raise FeedrateError(f"{META} names no tensor file")
    want = meta["tensors"]
    target = path / TENSORS
    try:
        size = target.stat().st_size
    except OSError:
        raise FeedrateError(f"no {TENSORS}") from None
    if size != want.get("bytes"):
        raise FeedrateError(f"{TENSORS} has {size} bytes; {META} says {want.get('bytes')!r}")
    with open(target, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest != want.get("sha256"):
        raise FeedrateError(f"{TENSORS} sha256 {digest[:12]}... differs from {META}'s")
    return meta


def latest(directory: Path, note: Callable[[str], None] | None = None) -> Checkpoint | None:
    """The newest complete checkpoint in `directory` (validated, `validate`), or None when it has none.

    A torn or damaged one is passed over, `note`d in one line each; a whole one with a bad value is an
    error (module docstring). When there are checkpoints but none is whole, that is an error too, naming
    each and what is wrong with it: starting afresh would overwrite the results they belong to."""
    passed: list[str] = []
    for path in checkpoints(directory):
        try:
            meta = _whole(path)
        except Oversized:
            raise
        except FeedrateError as exc:
            passed.append(f"{path.name}: {exc}")
            if note is not None:
                note(f"passed over checkpoint {path}: {exc}")
            continue
        validate(meta, path)
        return Checkpoint(path, meta)
    if passed:
        raise FeedrateError(
            f"no complete checkpoint in {directory}, though it holds {len(passed)} ({'; '.join(passed)}); "
            "restore one, or move them away to start afresh"
        )
    return None


# -- validation -----------------------------------------------------------------------------------------
def _bad(where: Path | str, key: str, value: Any, accepted: str) -> FeedrateError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return FeedrateError(f"checkpoint {where}: {key} {shown} is not accepted; expected {accepted}")


def _int(meta: Mapping[str, Any], key: str, where: Path | str, low: int = 0) -> int:
    value = meta.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise _bad(where, key, value, f"an integer >= {low}")
    return value


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


STATS_FIELDS = ("start", "batches", "samples", "loading", "duration", "compute", "first_batch", "first_step")


def check_stats(value: Any, where: Path | str, key: str) -> dict[str, Any]:
    """One rank's EpochStats as saved (training.timing fields): numbers, and `stages` a dict or None."""
    if not isinstance(value, dict) or any(not _number(value.get(f)) for f in STATS_FIELDS):
        raise _bad(where, key, value, f"a mapping of numbers {', '.join(STATS_FIELDS)}")
    stages = value.get("stages")
    if stages is not None and not (
        isinstance(stages, dict)
        and all(isinstance(v, dict) and all(_number(x) for x in v.values()) for v in stages.values())
    ):
        raise _bad(where, f"{key}.stages", stages, "a mapping of stage seconds or null")
    return value


def _rank_stats(value: Any, where: Path | str, key: str) -> None:
    if not isinstance(value, list) or not value:
        raise _bad(where, key, value, "a non-empty list (one entry per rank)")
    for r, stats in enumerate(value):
        check_stats(stats, where, f"{key}[{r}]")


def validate(meta: Mapping[str, Any], where: Path | str) -> None:
    """Every value of a checkpoint's meta.json that a resume reads, checked; a one-line FeedrateError
    naming the first bad one and what is accepted."""
    if meta.get("format") != FORMAT:
        raise _bad(where, "format", meta.get("format"), repr(FORMAT))
    if meta.get("version") != VERSION:
        raise _bad(where, "version", meta.get("version"), f"{VERSION} (this feedrate's checkpoint format)")
    step = _int(meta, "step", where, 1)
    if NAME.fullmatch(Path(where).name) and Path(where).name != checkpoint_name(step):
        raise _bad(where, "step", step, f"the step of its name, {Path(where).name}")
    epoch = _int(meta, "epoch", where, 1)
    batch = _int(meta, "batch", where, 0)
    if meta.get("phase") not in PHASES:
        raise _bad(where, "phase", meta.get("phase"), " or ".join(map(repr, PHASES)))
    config = meta.get("config")
    if not isinstance(config, dict) or any(k not in config for k in FROZEN.values()):
        raise _bad(where, "config", config, f"a mapping with {', '.join(FROZEN.values())}")
    epochs = config["epochs"]
    if not isinstance(epochs, int) or isinstance(epochs, bool) or not 1 <= epoch <= epochs:
        raise _bad(where, "epoch", epoch, f"1..{epochs!r} (config.epochs)")
    _int(meta, "workers", where, 0)
    _int(meta, "world_size", where, 1)
    schedule = meta.get("schedule")
    if not (
        isinstance(schedule, dict)
        and _int_ok(schedule.get("step"))
        and _int_ok(schedule.get("total"))
        and schedule["total"] >= 1
    ):
        raise _bad(where, "schedule", schedule, "{'step': int >= 0, 'total': int >= 1}")
    if not isinstance(meta.get("out"), str) or not meta["out"]:
        raise _bad(where, "out", meta.get("out"), "the run's output directory")
    csv = meta.get("csv")
    if not (
        isinstance(csv, dict)
        and _int_ok(csv.get("offset"))
        and csv["offset"] > 0
        and isinstance(csv.get("sha256"), str)
        and re.fullmatch(r"[0-9a-f]{64}", csv["sha256"])
    ):
        raise _bad(where, "csv", csv, "{'offset': bytes > 0, 'sha256': hex digest}")
    doc = meta.get("doc")
    if not isinstance(doc, dict) or not isinstance(doc.get("epochs"), list):
        raise _bad(where, "doc", doc, "the run.json document (a mapping with an `epochs` list)")
    mid_epoch = meta["phase"] == "train"
    last = doc["epochs"][-1] if doc["epochs"] else None
    if not mid_epoch and not (isinstance(last, dict) and last.get("epoch") == epoch):
        raise _bad(where, "doc.epochs", doc["epochs"][-1:], f"the record of epoch {epoch}'s training last")
    if mid_epoch and batch < 1:
        raise _bad(where, "batch", batch, "an integer >= 1 in a mid-epoch checkpoint")
    if mid_epoch != isinstance(meta.get("loader_state"), dict):
        raise _bad(where, "loader_state", meta.get("loader_state"), "a mapping mid-epoch, else null")
    if mid_epoch:
        _rank_stats(meta.get("epoch_ranks"), where, "epoch_ranks")
        accuracy = meta.get("accuracy")
        if not (isinstance(accuracy, list) and len(accuracy) == 3 and all(_int_ok(x) for x in accuracy)):
            raise _bad(where, "accuracy", accuracy, "[top-1 hits, top-5 hits, samples], integers >= 0")
        if not isinstance(meta.get("parts"), list):
            raise _bad(where, "parts", meta.get("parts"), "a list of the epoch's earlier parts")
    trained = meta.get("trained")
    if not isinstance(trained, list) or len(trained) != epoch - int(mid_epoch):
        raise _bad(where, "trained", trained, f"a list of {epoch - int(mid_epoch)} epochs' rank stats")
    for e, ranks in enumerate(trained):
        _rank_stats(ranks, where, f"trained[{e}]")
    counters = meta.get("counters")
    if not (
        isinstance(counters, dict)
        and all(isinstance(v, dict) and all(_int_ok(x) for x in v.values()) for v in counters.values())
    ):
        raise _bad(where, "counters", counters, "a mapping of split -> counter -> integer")
    rng = meta.get("rng")
    if not isinstance(rng, list) or len(rng) != meta["world_size"]:
        raise _bad(where, "rng", rng, f"one entry per rank ({meta['world_size']})")
    for r, state in enumerate(rng):
        _check_host_rng(state, where, f"rng[{r}]")


def _int_ok(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def check_unchanged(saved: Mapping[str, Any], now: Mapping[str, Any], where: Path | str) -> None:
    """The settings FROZEN holds (those in `now`) are those the checkpoint was made with; else an error
    naming the flag, the checkpoint's value and this run's."""
    for flag, key in FROZEN.items():
        if key in now and saved.get(key) != now[key]:
            raise FeedrateError(
                f"--resume: {flag} may not change on resume; checkpoint {where} has {key} "
                f"{saved.get(key)!r}, this run {now.get(key)!r}"
            )


# -- random number generators --------------------------------------------------------------------------
def host_rng() -> dict[str, Any]:
    """Python's and numpy's global generator states, as JSON-able data (torch's are tensors: `torch_rng`)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def torch_rng(device: torch.device) -> dict[str, torch.Tensor]:
    """torch's CPU generator state, and this rank's CUDA device's when it computes on one."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _check_host_rng(state: Any, where: Path | str, key: str) -> None:
    ok = isinstance(state, dict)
    py = state.get("python") if ok else None
    ok = ok and isinstance(py, list) and len(py) == 3 and py[0] == 3 and isinstance(py[1], list)
    ok = ok and len(py[1]) == 625 and all(_int_ok(x) and x < 1 << 32 for x in py[1]) and py[1][-1] <= 624
    ok = ok and (py[2] is None or _number(py[2]))
    nps = state.get("numpy") if ok else None
    ok = ok and isinstance(nps, list) and len(nps) == 5 and nps[0] == "MT19937" and isinstance(nps[1], list)
    ok = ok and len(nps[1]) == 624 and all(_int_ok(x) and x < 1 << 32 for x in nps[1])
    ok = ok and _int_ok(nps[2]) and nps[2] <= 624 and nps[3] in (0, 1) and _number(nps[4])
    if not ok:
        raise _bad(where, key, state, "python's and numpy's MT19937 states")


def restore_rng(host: Mapping[str, Any], tensors: Mapping[str, Any], device: torch.device) -> None:
    """Put the generators back as `host_rng` and `torch_rng` saved them (host checked by `validate`; a
    torch state that is not one is a FeedrateError). A CUDA state is restored only onto CUDA."""
    py = host["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = host["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    try:
        torch.set_rng_state(tensors["cpu"])
        if device.type == "cuda" and "cuda" in tensors:
            torch.cuda.set_rng_state(tensors["cuda"], device)
    except (KeyError, TypeError, RuntimeError) as exc:
        raise FeedrateError(f"checkpoint: torch's RNG state is not one ({type(exc).__name__})") from None


def rank_of(saved_world: int, rank: int) -> int:
    """Whose saved per-rank state rank `rank` takes: its own, or with more ranks now than then, that of
    rank `rank mod saved_world` (every rank's generators start from the same seed in any case)."""
    return rank % saved_world


# -- the learning-rate schedule across a resume -----------------------------------------------------------
def schedule_step(saved_step: int, saved_total: int, total: int) -> int:
    """The schedule step to continue from when the run's planned steps changed from `saved_total` to
    `total` (another world size or --max-batches): the same fraction of the schedule, rounded to a step.
    Unchanged, exactly `saved_step`."""
    return (2 * saved_step * total + saved_total) // (2 * saved_total)
