"""What the bench measures: its variants (loader x storage x encoding x workers x device, and the network
for remote storage), and the plan of them for one run, each with the reason it cannot run here."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from loaders import BACKENDS

LOADERS = tuple(BACKENDS)
STORAGES = ("local", "s3", "cos")
# Loaders that read the CIFAR python batches rather than the shards: encoding does not apply.
BATCH_READERS = ("torchvision", "tensor")


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


def plan(args: argparse.Namespace, cuda: bool) -> list[tuple[Variant, str | None]]:
    """Every requested variant, with the reason it cannot run here (or None); the baseline (torchvision
    on local disk) first, since every ratio needs it."""
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
    variants.sort(key=lambda v: (v[0].loader != "torchvision" or v[0].storage != "local", v[0].workers))
    return variants
