"""Which device a run computes on, and how many CPU threads its model gets.

`--device auto` picks CUDA when present; asking for CUDA without it is an error, never a silent fallback
that would time the wrong machine. Under torchrun each process takes the GPU of its LOCAL_RANK
(cuda:LOCAL_RANK), so a node runs at most one process per GPU.

The CPU thread policy: on the CPU the model's intra-op threads share the cores with the loader's worker
processes (and with the node's other ranks). Left at one thread per core they spin-wait against the
workers and a step runs several times slower (4x for the small net on 2 cores with 2 workers), so the
model gets the cores the workers leave, at least one, unless OMP_NUM_THREADS says otherwise (torchrun
sets it to 1 for several processes per node unless it is set already).
"""

from __future__ import annotations

import os

import torch

from feedrate.errors import FeedrateError
from training.distributed import Topology
from training.results import device_name, machine

DEVICES = ("auto", "cuda", "cpu")


def resolve_device(name: str, workers: int, topology: Topology | None = None) -> torch.device:
    """The device `name` (one of DEVICES) means here; on the CPU, also set torch's thread count."""
    if name not in DEVICES:
        raise FeedrateError(f"unknown --device {name!r}; accepted: {', '.join(DEVICES)}")
    topology = topology or Topology()
    if name == "cuda" and not torch.cuda.is_available():
        raise FeedrateError("--device cuda: no CUDA device is available here; use --device auto or cpu")
    if name != "cpu" and torch.cuda.is_available():
        if topology.distributed:
            count = torch.cuda.device_count()
            if topology.local_rank >= count:
                raise FeedrateError(
                    f"LOCAL_RANK={topology.local_rank} needs a GPU of its own and this node has {count}; "
                    f"run at most {count} processes per node, or use --device cpu"
                )
            torch.cuda.set_device(topology.local_rank)
        return torch.device("cuda", torch.cuda.current_device())
    if "OMP_NUM_THREADS" not in os.environ:
        cores = machine()["cpu_usable"] // topology.local_world_size
        torch.set_num_threads(max(1, cores - workers))
    return torch.device("cpu")


def device_line(device: torch.device, requested: str, topology: Topology | None = None) -> str:
    """What the run computes on, for the user: `device cpu (requested; 1 compute threads)`."""
    topology = topology or Topology()
    processes = f"; {topology.world_size} processes" if topology.distributed else ""
    if device.type == "cuda":
        return f"device {device} ({device_name(device)}){processes}"
    why = "requested" if requested == "cpu" else "no CUDA device found"
    return f"device cpu ({why}; {torch.get_num_threads()} compute threads{processes})"
