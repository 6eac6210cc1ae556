"""The DALI loader's state_dict() / load_state_dict() (loaders.resume's contract) through DALI's real CPU
pipeline on real shards: k batches, a state, a fresh loader given it, the rest.

Every image names its sample: red and green hold its source index (which the shard member's key holds
too, so the index files map it to the sample's id), blue grows along x, so a crop shows as a shifted
zero border and a flip as a reversed gradient. Ranks of one run are loaders of one process.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from feedrate.cifar import write_batch_dir
from feedrate.errors import FeedrateError
from feedrate.manifest import MANIFEST_NAME
from feedrate.shardformat import write_index
from loaders import CIFAR10_MEAN, CIFAR10_STD, LoaderConfig, make_loader
from loaders.dali_pipe import INDEX_DIR_PREFIX, INDEX_LOCK, DaliError, DaliLoader, _sweep_index_dirs
from loaders.dali_state import _fields, checkpoint_position, decode_checkpoint, encode_checkpoint, rank_part
from loaders.resume import encode, merge
from loaders.shards import open_dataset
from shardgen import ShardgenConfig, build
from tests.helpers import needs_dali

N, SHARD, BATCH = 90, 25, 8  # shards of 25, 25, 25, 15; an odd last batch
MEAN = torch.tensor(CIFAR10_MEAN)[:, None, None]
STD = torch.tensor(CIFAR10_STD)[:, None, None]
Batches = list[tuple[torch.Tensor, torch.Tensor]]


def write_dataset(root: Path, n: int = N, shard_size: int = SHARD) -> Path:
    """n raw training samples (labels index mod 10) through shardgen's `--source PATH`."""
    index = np.arange(n)
    images = np.empty((n, 32, 32, 3), dtype=np.uint8)
    images[..., 0] = (index % 256)[:, None, None]
    images[..., 1] = (index // 256)[:, None, None]
    images[..., 2] = (8 * np.arange(32) + 4)[None, None, :]
    labels = index % 10
    source = root / "src" / "cifar-10-batches-py"
    splits = {"train": (images, labels), "test": (images[:20], labels[:20])}
    write_batch_dir(source, splits, [f"c{i}" for i in range(10)], label="state")
    build(ShardgenConfig(dest=str(root / "ds"), source=str(source), fmt="raw", shard_size=shard_size))
    return root / "ds"


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("dali-state"))


def id_of(root: Path, split: str = "train") -> dict[int, int]:
    """Source index (what the pixels say) -> sample id (loaders.resume's shard-order numbering)."""
    ds = open_dataset(str(root))
    table, first = {}, 0
    for ref in ds.shards(split):
        lines = (root / ref.index_name).read_text().splitlines()[1:]
        for j, line in enumerate(lines):
            table[int(line.split()[3].split(".")[0].rsplit("_", 1)[1])] = first + j
        first += ref.samples
    return table


def ids(batches: Batches, table: dict[int, int]) -> list[int]:
    out = []
    for images, _ in batches:
        centre = torch.round(images[:, :2, 16, 16] * STD[:2, 0, 0] * 255 + MEAN[:2, 0, 0] * 255).long()
        out += [table[int(i)] for i in (centre[:, 0] + 256 * centre[:, 1])]
    return out


def dali(root: Path, **kw: object) -> DaliLoader:
    settings: dict = {"batch_size": BATCH, "train": True, "workers": 1, "seed": 7, "split": "train"} | kw
    loader = make_loader("dali", LoaderConfig(data=str(root), **settings))
    assert isinstance(loader, DaliLoader)
    return loader


def take(loader: DaliLoader, k: int | None = None, epoch: int | None = 1) -> Batches:
    """k batches (all when None) of `epoch` (None: the epoch already set), copied out."""
    if epoch is not None:
        loader.set_epoch(epoch)
    out: Batches = []
    for x, y in loader:
        out.append((x.clone(), y.clone()))
        if k is not None and len(out) == k:
            break
    return out


def flat(lists: list[list[int]]) -> list[int]:
    return [x for part in lists for x in part]


def same(a: Batches, b: Batches) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b, strict=False)
    )


def interrupted(root: Path, world: int, steps: list[int], **kw: object) -> tuple[dict, list[list[int]]]:
    """Each rank of `world` reads steps[rank] batches of epoch 1; the merged state and the ids read."""
    table = id_of(root)
    states, read = [], []
    for rank in range(world):
        with dali(root, rank=rank, world_size=world, **kw) as loader:
            batches = take(loader, steps[rank])
            states.append(loader.state_dict())
            read.append(ids(batches, table))
    return merge(states), read


def resumed(root: Path, state: dict, world: int, **kw: object) -> list[DaliLoader]:
    """Loaders of `world` ranks given `state`, at its epoch, as train.py leaves them on resume."""
    loaders = []
    for rank in range(world):
        loader = dali(root, rank=rank, world_size=world, **kw)
        loader.load_state_dict(state)
        loader.set_epoch(state["epoch"])
        loaders.append(loader)
    return loaders


# -- the same counts: the continuation is the uninterrupted run's --------------------------------------
@needs_dali
@pytest.mark.parametrize(("world", "train"), [(1, True), (2, True), (3, True), (2, False)])
def test_same_counts_continue_with_the_uninterrupted_batches(raw: Path, world: int, train: bool) -> None:
    table = id_of(raw)
    whole = []
    for rank in range(world):
        with dali(raw, rank=rank, world_size=world, train=train) as loader:
            whole.append(take(loader))
    k = 2
    state, before = interrupted(raw, world, [k] * world, train=train)
    assert state["count"] == sum(map(len, before)) and state["epoch"] == 1
    after, again = [], []
    for rank, loader in enumerate(resumed(raw, state, world, train=train)):
        rest = whole[rank][k:]
        assert (len(loader), loader.samples) == (len(rest), sum(len(y) for _, y in rest))
        again.append(loader.state_dict())  # saved again before the first resumed batch
        got = take(loader, epoch=None)
        assert same(got, rest), f"rank {rank}: the resumed batches differ from the uninterrupted run's"
        after += ids(got, table)
        loader.close()
    assert Counter(flat(before) + after) == Counter(range(N))  # the split, exactly once
    for rank, loader in enumerate(resumed(raw, merge(again), world, train=train)):
        assert same(take(loader, epoch=None), whole[rank][k:]), rank
        loader.close()


@needs_dali
def test_a_resumed_epoch_can_be_resumed_again_exactly(raw: Path) -> None:
    """Elastic first (2 ranks -> 3): the resumed epoch's pipeline reads a remainder; its state keeps that
    remainder's basis, so 3 ranks continue it exactly, and 1 rank finishes it exactly once."""
    table = id_of(raw)
    first, before = interrupted(raw, 2, [3, 2])
    reference = [take(ld, epoch=None) for ld in resumed(raw, first, 3)]
    states, middle = [], []
    for rank, loader in enumerate(resumed(raw, first, 3)):
        got = take(loader, 2, epoch=None)
        assert same(got, reference[rank][:2])
        middle += ids(got, table)
        states.append(loader.state_dict())
    second = merge(states)
    assert all(e["basis"] is not None for e in second["ranks"])
    for rank, loader in enumerate(resumed(raw, second, 3)):
        assert same(take(loader, epoch=None), reference[rank][2:]), rank
    (alone,) = resumed(raw, second, 1)
    rest = ids(take(alone, epoch=None), table)
    assert Counter(flat(before) + middle + rest) == Counter(range(N))


@needs_dali
def test_another_option_falls_back_to_the_remainder_exactly_once(raw: Path) -> None:
    """exact is for the same pipeline: with another batch size (or another DALI) the rest is dealt out
    again, still exactly once."""
    table = id_of(raw)
    state, before = interrupted(raw, 1, [3])
    (loader,) = resumed(raw, state, 1, batch_size=5)
    assert loader.samples == N - 24 and len(loader) == -(-(N - 24) // 5)
    rest = take(loader, epoch=None)
    assert {len(y) for _, y in rest[:-1]} == {5}
    assert Counter(before[0] + ids(rest, table)) == Counter(range(N))


# -- other counts: the remainder dealt out again, exactly once ----------------------------------------
@needs_dali
@pytest.mark.parametrize(
    ("world", "steps", "new_world", "new_workers"),
    [(2, [3, 1], 3, 1), (2, [4, 4], 1, 1), (1, [5], 4, 1), (3, [1, 2, 0], 2, 1), (2, [2, 2], 2, 2)],
)
def test_other_counts_read_the_rest_exactly_once(
    raw: Path, world: int, steps: list[int], new_world: int, new_workers: int
) -> None:
    table = id_of(raw)
    state, before = interrupted(raw, world, steps)
    consumed = flat(before)
    left = N - len(consumed)
    after = []
    for rank, loader in enumerate(resumed(raw, state, new_world, workers=new_workers)):
        part = rank_part(left, rank, new_world)[0]  # contiguous parts: they differ by at most one
        assert (loader.samples, len(loader)) == (part, -(-part // BATCH))
        got = take(loader, epoch=None)
        assert sum(len(y) for _, y in got) == part and len(got) == -(-part // BATCH)
        after += ids(got, table)
        assert loader.state_dict()["count"] == len(consumed) + part
    assert not set(after) & set(consumed)
    assert Counter(consumed + after) == Counter(range(N))


@needs_dali
def test_a_few_samples_left_for_many_ranks(raw: Path) -> None:
    """Fewer samples left than ranks: each rank gets at most one, none is read twice."""
    table = id_of(raw)
    state, before = interrupted(raw, 1, [11])  # 88 of 90 read
    loaders = resumed(raw, state, 5)
    assert [ld.samples for ld in loaders] == [rank_part(2, r, 5)[0] for r in range(5)] == [0, 0, 1, 0, 1]
    after = flat([ids(take(ld, epoch=None), table) for ld in loaders])
    assert Counter(before[0] + after) == Counter(range(N))


@needs_dali
def test_later_epochs_are_whole_and_the_uninterrupted_runs(raw: Path) -> None:
    state, _ = interrupted(raw, 2, [2, 2])
    with dali(raw) as plain:
        expected = take(plain, epoch=2)
    (loader,) = resumed(raw, state, 1)
    take(loader, epoch=None)
    assert len(loader) == -(-N // BATCH)  # the resumed epoch was read to its end: whole again
    assert same(take(loader, epoch=2), expected)
    loader.close()


@needs_dali
def test_a_state_saved_at_the_end_of_an_epoch_resumes_nothing_of_it(raw: Path) -> None:
    table = id_of(raw)
    with dali(raw) as loader:
        whole = take(loader)
        state = loader.state_dict()
    assert state["count"] == N and state["exact"]["dali"] is None
    (again,) = resumed(raw, state, 1)
    assert (again.samples, len(again), take(again, epoch=None)) == (0, 0, [])
    assert sorted(ids(take(again, epoch=2), table)) == list(range(N))
    assert same(take(again, epoch=1), whole)  # the same epoch set again is whole, as it was
    again.close()


@needs_dali
def test_each_sample_keeps_its_crop_and_flip_whoever_reads_it(raw: Path) -> None:
    """On the CPU the augmentation is looked up by sample id (EpochDraws): a sample looks the same in a
    resumed epoch on 3 ranks as in the uninterrupted one on 1."""
    table = id_of(raw)
    with dali(raw) as loader:
        whole = take(loader)
    by_id = dict(zip(ids(whole, table), torch.cat([x for x, _ in whole]), strict=True))
    state, _ = interrupted(raw, 2, [2, 3])
    for loader in resumed(raw, state, 3):
        got = take(loader, epoch=None)
        for sample, image in zip(ids(got, table), torch.cat([x for x, _ in got]), strict=True):
            assert torch.equal(image, by_id[sample]), sample


@needs_dali
def test_the_in_graph_augmentation_continues_exactly_too(raw: Path) -> None:
    """The GPU path augments inside DALI (random operators whose state is in DALI's checkpoint). Its CPU
    twin -- the same graph built without a GPU -- continues exactly from a checkpoint."""

    def in_graph(loader: DaliLoader) -> DaliLoader:
        loader._spec = dataclasses.replace(loader._spec, augment=True)  # the GPU path's graph, on the CPU
        loader._fresh = False  # the pipeline built with the loader is the other graph
        return loader

    with in_graph(dali(raw)) as loader:
        whole = take(loader)
    with in_graph(dali(raw)) as loader:
        take(loader, 4)
        state = loader.state_dict()
    assert len(decode_checkpoint(state["exact"]["dali"])) > 300  # the random operators' states too
    loader = in_graph(dali(raw))
    loader.load_state_dict(state)
    loader.set_epoch(1)
    assert same(take(loader, epoch=None), whole[4:])
    loader.close()


# -- skip_bad ------------------------------------------------------------------------------------------
def rewrite(root: Path, shard: str, edit) -> None:  # type: ignore[no-untyped-def]
    """Shard `shard` rewritten with `edit(members)` (a list of (name, bytes)), re-indexed, the manifest
    brought in line."""
    path = root / shard
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]  # type: ignore[union-attr]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in edit(members):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    write_index(path, path.with_suffix(".idx"))
    doc = json.loads((root / MANIFEST_NAME).read_text())
    import hashlib

    for entry in doc["splits"]["train"]["shards"]:
        if entry["name"] == shard:
            idx = path.with_suffix(".idx")
            entry.update(bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
            entry["index"].update(
                bytes=idx.stat().st_size, sha256=hashlib.sha256(idx.read_bytes()).hexdigest()
            )
    (root / MANIFEST_NAME).write_text(json.dumps(doc, indent=2))


@needs_dali
def test_skipped_samples_are_neither_yielded_nor_missing(tmp_path: Path) -> None:
    root = write_dataset(tmp_path)
    keys = [ln.split()[3].split(".")[0] for ln in (root / "train-000001.idx").read_text().splitlines()[1:]]
    no_label, bad_label = keys[2], keys[5]
    rewrite(
        root,
        "train-000001.tar",
        lambda ms: [(n, b"x7" if n == f"{bad_label}.cls" else d) for n, d in ms if n != f"{no_label}.cls"],
    )
    table = id_of(root)
    bad = {table[int(k.rsplit("_", 1)[1])] for k in (no_label, bad_label)}
    opts = {"options": {"skip_bad": True}}
    with dali(root, **opts) as loader:
        whole = take(loader)
    for k in (2, 8):  # before and after the bad label is read, whichever batch it falls in
        state, before = interrupted(root, 1, [k], **opts)
        (loader,) = resumed(root, state, 1, **opts)
        assert same(take(loader, epoch=None), whole[k:])
        state_elastic = loader.state_dict()
        assert state_elastic["count"] == N - 2
        loader.close()
        after = []
        for loader in resumed(root, state, 2, **opts):
            after += ids(take(loader, epoch=None), table)
            assert loader.stats()["skipped"] <= 2
        assert Counter(before[0] + after) == Counter(set(range(N)) - bad)


# -- bad states ----------------------------------------------------------------------------------------
def _exact(state: dict) -> dict:
    return state["exact"]


def _other_position(raw: Path) -> str:
    with dali(raw) as loader:
        take(loader, 2)
        return loader.state_dict()["exact"]["dali"]


BAD = {
    "read out of range": (
        lambda s, raw: _exact(s).update(read=10**9),
        r"exact\.read 1000000000; accepted: 0\.\.90",
    ),
    "read negative": (lambda s, raw: _exact(s).update(read=-1), r"exact\.read -1"),
    "dali not base64": (lambda s, raw: _exact(s).update(dali="%%%"), r"exact\.dali is not base64"),
    "dali not a checkpoint": (
        lambda s, raw: _exact(s).update(dali="AAEC" * 8),
        r"exact\.dali is not a checkpoint of the dali loader's pipeline",
    ),
    "dali of another position": (
        lambda s, raw: _exact(s).update(dali=_other_position(raw)),
        r"exact\.dali is at \(reader epoch, samples, batches, counted, shard\) \(0, 16, 2, 16, \[0\]\); "
        r"exact\.read 24 says \(0, 24, 3, 24, \[0\]\)",
    ),
    "dali missing": (lambda s, raw: _exact(s).update(dali=None), r"exact\.dali is missing"),
    "yielded": (
        lambda s, raw: _exact(s).update(yielded=23),
        r"count 24 is not the 0 samples left out before",
    ),
    "basis": (
        lambda s, raw: _exact(s).update(basis=encode(np.ones(N, dtype=bool))),
        r"exact\.basis holds samples its `consumed` lacks",
    ),
    "exact keys": (lambda s, raw: _exact(s).pop("yielded"), r"exact must be a mapping of spec, read"),
    "seed": (lambda s, raw: s.update(seed=8), r"loader state is for seed 8; this loader reads seed 7"),
}


@needs_dali
@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_state_is_a_one_line_error(raw: Path, case: str) -> None:
    edit, message = BAD[case]
    with dali(raw) as loader:
        take(loader, 3)
        state = copy.deepcopy(loader.state_dict())
    at = checkpoint_position(decode_checkpoint(state["exact"]["dali"]), "shards")
    assert (at.reader_age, at.batches) == (24, 3)
    edit(state, raw)
    with dali(raw) as fresh, pytest.raises(FeedrateError, match=message) as caught:
        fresh.load_state_dict(state)
    assert "\n" not in str(caught.value)


@needs_dali
def test_the_loader_removes_its_index_files(raw: Path) -> None:
    state, _ = interrupted(raw, 1, [2])
    loader, other = resumed(raw, state, 2)
    other.close()
    folder = loader._index_dir
    assert sorted(p.name for p in folder.iterdir()) == [INDEX_LOCK, "split"]
    take(loader, epoch=None)
    assert sorted(p.name for p in folder.iterdir()) == [
        INDEX_LOCK,
        "split",
    ]  # a remainder's files go once read
    loader.close()
    assert not folder.exists()


@needs_dali
def test_an_empty_label_is_a_bad_label_not_the_next_members_header(tmp_path: Path) -> None:
    """An empty .cls member has no data block: its widened span runs into the next member's header, which
    the label's size (from the index) masks off."""
    root = write_dataset(tmp_path, n=30, shard_size=15)
    key = (root / "train-000000.idx").read_text().splitlines()[4].split()[3].split(".")[0]
    rewrite(root, "train-000000.tar", lambda ms: [(n, b"" if n == f"{key}.cls" else d) for n, d in ms])
    with (
        dali(root) as loader,
        pytest.raises(FeedrateError, match=r"a \.cls member holds b''; expected ASCII"),
    ):
        take(loader)
    with dali(root, options={"skip_bad": True}) as loader:
        got = ids(take(loader), id_of(root))
        assert sorted(got) == sorted(set(range(30)) - {id_of(root)[int(key.rsplit("_", 1)[1])]})
        assert loader.stats()["skipped"] == 1


# -- a crafted DALI checkpoint, a bitmap that is not the position's, another dataset -------------------
def _message(pairs: list[tuple[int, object]]) -> bytes:
    """A protobuf message from (field number, int | bytes) pairs (loaders.dali_state._fields' inverse)."""

    def varint(value: int) -> bytes:
        out = bytearray()
        while True:
            out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
            value >>= 7
            if not value:
                return bytes(out)

    data = b""
    for number, value in pairs:
        if isinstance(value, int):
            data += varint(number << 3) + varint(value)
        else:
            assert isinstance(value, bytes)
            data += varint(number << 3 | 2) + varint(len(value)) + value
    return data


def _recrafted(
    text: str, pipeline: dict | None = None, iterator: dict | None = None, twice: bool = False
) -> str:
    """A DALI checkpoint (base64) with its pipeline's and iterator's JSON updated (`twice`: the honest
    context kept before the crafted one, as protobuf lets a later copy override an earlier one)."""
    data = decode_checkpoint(text)
    top = _fields(data)
    assert _message(top) == data  # the re-encoding is faithful
    out = []
    for number, value in top:
        if number == 2:
            context = dict(_fields(value))
            doc = [json.loads(context[1]), json.loads(context[2])]
            doc[0].update(pipeline or {})
            doc[1].update(iterator or {})
            if twice:
                out.append((number, value))
            value = _message([(1, json.dumps(doc[0]).encode()), (2, json.dumps(doc[1]).encode())])
        out.append((number, value))
    return encode_checkpoint(_message(out))


def _one_state(raw: Path, k: int) -> dict:
    """A one-rank loader's state after k batches of epoch 1."""
    with dali(raw) as loader:
        take(loader, k)
        return copy.deepcopy(loader.state_dict())


CRAFTED = {
    "per-shard counter": (
        {"iterator": {"_counter_per_gpu": [5]}},
        r"exact\.dali's \(pipeline epoch, per-shard counters, shard sizes\) are \(0, \[5\], \[90\]\); "
        r"this plan's are \(0, \[0\], \[90\]\)",
    ),
    "shard sizes": (
        {"iterator": {"_shard_sizes_per_gpu": [200]}},
        r"are \(0, \[0\], \[200\]\); this plan's are \(0, \[0\], \[90\]\)",
    ),
    "pipeline epoch": ({"pipeline": {"epoch_idx": 3}}, r"are \(3, \[0\], \[90\]\)"),
    "counter a list": ({"iterator": {"_counter_per_gpu": 0}}, r"exact\.dali is not a checkpoint"),
    "context twice": (
        {"iterator": {"_shard_sizes_per_gpu": [200]}, "twice": True},
        r"exact\.dali is not a checkpoint",
    ),
}


@needs_dali
@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_a_crafted_dali_checkpoint_is_refused_in_one_line(raw: Path, case: str) -> None:
    """What DALI's iterator restores besides its counter (per-shard counters and sizes, by which PARTIAL
    cuts the padding off; the pipeline's epoch) is held to the plan's before DALI sees it."""
    edit, message = CRAFTED[case]
    state = _one_state(raw, 3)
    state["exact"]["dali"] = _recrafted(state["exact"]["dali"], **edit)
    with dali(raw) as fresh, pytest.raises(FeedrateError, match=message) as caught:
        fresh.load_state_dict(state)
    assert "\n" not in str(caught.value)


@needs_dali
def test_a_crafted_epoch_length_is_refused_as_dali_restores_it(raw: Path) -> None:
    """The iterator's epoch length is DALI's own to compute: it is compared with the one it computed as
    the pipeline is built (the first iteration), a one-line error."""
    state = _one_state(raw, 3)
    state["exact"]["dali"] = _recrafted(state["exact"]["dali"], iterator={"_size": 1000})
    with dali(raw) as fresh:
        fresh.load_state_dict(state)
        fresh.set_epoch(1)
        with pytest.raises(
            FeedrateError, match=r"cannot restore exact\.dali: .*size is 1000; DALI's own is 90"
        ):
            take(fresh, epoch=None)
    honest = _one_state(raw, 3)  # the same checkpoint untouched goes through the check
    (loader,) = resumed(raw, honest, 1)
    batches = iter(loader)
    next(batches)
    assert loader._iterator.restored  # (a pipeline read to its end is released: asked before)
    assert 1 + sum(1 for _ in batches) == len(range(3, -(-N // BATCH)))
    loader.close()


@needs_dali
def test_more_samples_than_the_part_has_left_is_a_dali_error(raw: Path) -> None:
    """Should DALI hand over more than the rank's part has left (its padding taken for samples), the
    epoch fails there rather than yielding it and running past its end."""
    with dali(raw) as loader:
        loader.set_epoch(1)
        plan = loader._pending()
        loader._whole = dataclasses.replace(plan, part=plan.part - 3)  # DALI still reads all 90
        got = 0
        with pytest.raises(
            DaliError, match=r"DALI handed over 8 samples with 7 of this rank's part of 87 left"
        ):
            for _, y in loader:
                got += len(y)
        assert got == 80


@needs_dali
def test_a_bitmap_that_is_not_the_positions_samples_is_refused(raw: Path) -> None:
    """As many samples consumed as the position says, but not the same ones (one swapped for another):
    the ranks' id digests (exact.ids) do not add up to the bitmap's, and the state is refused."""
    state, before = interrupted(raw, 2, [3, 2])
    consumed = np.zeros(N, dtype=bool)
    consumed[flat(before)] = True
    assert encode(consumed) == state["consumed"]
    swapped = consumed.copy()
    swapped[flat(before)[0]] = False
    swapped[np.flatnonzero(~consumed)[0]] = True
    bad = copy.deepcopy(state) | {"consumed": encode(swapped)}
    with dali(raw, rank=0, world_size=2) as fresh:
        with pytest.raises(
            FeedrateError, match=r"the 40 samples `consumed` holds beyond exact\.basis are not"
        ):
            fresh.load_state_dict(bad)
        fresh.load_state_dict(state)  # the honest one is taken
    wrong = copy.deepcopy(state)
    wrong["ranks"][1]["ids"] = "xyz"
    with dali(raw, rank=0, world_size=2) as fresh, pytest.raises(FeedrateError, match=r"exact\.ids \["):
        fresh.load_state_dict(wrong)


@needs_dali
def test_a_state_of_another_dataset_of_as_many_samples_is_refused(raw: Path, tmp_path: Path) -> None:
    other = write_dataset(tmp_path, shard_size=30)  # 90 samples too, in other shards
    state, _ = interrupted(raw, 1, [2])
    with (
        dali(other) as loader,
        pytest.raises(FeedrateError, match=r"loader state is for dataset 'raw-") as caught,
    ):
        loader.load_state_dict(state)
    assert "\n" not in str(caught.value)


# -- the index directories' sweep ------------------------------------------------------------------------
def _index_dir(pid: int, lock: bool = True) -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=f"{INDEX_DIR_PREFIX}{pid}-"))
    if lock:
        (path / INDEX_LOCK).touch()
    return path


def _gone_pid() -> int:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(done.stdout)


def test_the_sweep_keeps_a_locked_index_dir_whatever_its_name_says(monkeypatch: pytest.MonkeyPatch) -> None:
    """Liveness is the owner's flock, not its pid: a directory named by a pid that is gone here (its
    owner in another PID namespace sharing /tmp) but locked stays; unlocked, it goes; another user's
    stays; one without a lock file (an older feedrate's) goes once it is old and its pid is gone."""
    import os
    import subprocess
    import sys
    import time

    gone = _gone_pid()
    held, free, young, old = (
        _index_dir(gone),
        _index_dir(gone),
        _index_dir(gone, False),
        _index_dir(gone, False),
    )
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); "
            "print('locked', flush=True); sys.stdin.read()",
            str(held / INDEX_LOCK),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with monkeypatch.context() as patch:
            patch.setattr(os, "getuid", lambda: os.geteuid() + 1)  # every directory is another user's
            _sweep_index_dirs()
        assert all(p.exists() for p in (held, free, young, old))
        _sweep_index_dirs()
        assert held.exists() and not free.exists() and young.exists() and not old.exists()
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
        for path in (held, young):
            shutil.rmtree(path, ignore_errors=True)
    assert not held.exists()


@needs_dali
def test_a_live_loaders_index_dir_is_locked_and_a_killed_ones_swept(raw: Path) -> None:
    """A loader's own directory is locked for as long as it lives (another loader's sweep leaves it);
    a killed process's lock is gone with it, and the next loader removes its directory."""
    import subprocess
    import sys

    code = (
        "import sys; from loaders import LoaderConfig, make_loader; "
        f"cfg = LoaderConfig(data={str(raw)!r}, split='train', batch_size=8, train=True); "
        "ld = make_loader('dali', cfg); "
        "print(ld._index_dir, flush=True); sys.stdin.read()"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    try:
        assert child.stdout is not None
        theirs = Path(child.stdout.readline().strip())
        assert (theirs / INDEX_LOCK).exists()
        with dali(raw) as mine:
            assert theirs.exists() and (mine._index_dir / INDEX_LOCK).exists()
            with dali(raw):
                assert mine._index_dir.exists()  # a second loader of this process leaves the first's
        child.kill()
        child.wait(timeout=30)
        with dali(raw):
            assert not theirs.exists()
    finally:
        if child.poll() is None:
            child.kill()
