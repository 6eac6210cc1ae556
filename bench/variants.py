"""What the bench measures: its variants (loader x storage x encoding x workers x device, and the network
for remote storage), the peers beside them, and the plan of them for one run, each with the reason it
cannot run here."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from bench.peers import PEERS, unavailable
from loaders import BACKENDS

LOADERS = tuple(BACKENDS)
STORAGES = ("local", "s3", "cos")
# Loaders that read the CIFAR python batches rather than the shards: encoding does not apply.
BATCH_READERS = ("torchvision", "tensor")
BASELINE = ("torchvision", "local")  # (loader, storage) of the baseline of every ratio
FIRST, LAST = "first", "last"  # the baseline's two passes in a run


@dataclass(frozen=True)
class Variant:
    loader: str  # a feedrate loader (loaders.BACKENDS) or a peer (bench.peers.PEERS)
    storage: str
    encoding: str  # jpg | png | raw, or "batches" for the loaders that read the python batches
    workers: int
    device: str  # cpu | cuda
    net: str = ""  # remote storage: the network preset read through ("loopback": unshaped); local: ""
    baseline_pass: str = ""  # the baseline's FIRST or LAST measurement in the run; "" for every other row

    @property
    def name(self) -> str:
        net = f"/{self.net}" if self.net else ""
        when = f" ({self.baseline_pass})" if self.baseline_pass else ""
        return f"{self.loader}/{self.storage}{net}/{self.encoding}/w{self.workers}/{self.device}{when}"

    @property
    def is_baseline(self) -> bool:
        return (self.loader, self.storage) == BASELINE


def plan(args: argparse.Namespace, cuda: bool) -> list[tuple[Variant, str | None]]:
    """Every requested variant, with the reason it cannot run here (or None).

    The baseline (torchvision on local disk, per worker count) is measured whether or not it was asked
    for, first and again last: every ratio needs it, and the machine may have got faster or slower
    between (a neighbour started or stopped), which the two passes show and the bench flags. The
    peers (`args.peers`, local storage only) run after the loaders, one per encoding asked for."""
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
                            if (loader, storage, device) == (*BASELINE, "cpu"):
                                continue  # the baseline: its two passes are added below
                            variants.append((Variant(loader, storage, encoding, workers, device, net), None))
                        if loader == "dali" and not cuda:
                            reason = "DALI mixed (nvJPEG) decode needs a CUDA GPU; none on this machine"
                            v = Variant(loader, storage, encoding, workers, "cuda", net)
                            variants.append((v, reason))
        if args.peers and "local" in args.storage:
            for peer in PEERS:
                reason = unavailable(peer)
                variants += [(Variant(peer, "local", e, workers, "cpu"), reason) for e in args.formats]
    first = [(Variant(*BASELINE, "batches", w, "cpu", baseline_pass=FIRST), None) for w in args.workers]
    last = [(Variant(*BASELINE, "batches", w, "cpu", baseline_pass=LAST), None) for w in args.workers]
    return first + variants + last
