"""The host-to-device copy, one rule for every loader.

Pinned (page-locked) memory only on CUDA: there it lets the copy run asynchronously (`non_blocking`),
overlapped with the step; on the CPU pinning costs a copy and buys nothing (and needs a CUDA build).
"""

from __future__ import annotations

import torch


def pins(device: torch.device | str) -> bool:
    """Whether host batches bound for `device` should be pinned (e.g. a DataLoader's `pin_memory`)."""
    return torch.device(device).type == "cuda"


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` on `device`: pinned first (unless it is already, or already on a device) and copied
    without blocking on CUDA; unchanged when it is already there."""
    device = torch.device(device)
    if pins(device) and tensor.device.type == "cpu":
        if not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(device, non_blocking=True)
    return tensor.to(device)
