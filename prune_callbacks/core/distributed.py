"""Keeping masks identical on every process.

Under DDP the gradients are all-reduced, so every rank computes the same
scores; broadcasting the (1-byte) masks from rank 0 at each update makes the
equality a guarantee rather than a consequence of bitwise-identical
arithmetic. It costs one collective per mask update, not per step.
"""

from __future__ import annotations

from typing import Sequence

import torch


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def collective_device() -> torch.device:
    """Where a tensor made for a collective must live: the current GPU under NCCL, else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_masks(masks: Sequence[torch.Tensor]) -> None:
    """Overwrite every rank's masks with rank 0's, in place (one flat uint8 broadcast)."""
    if not is_distributed() or not masks:
        return
    flat = torch.cat([m.reshape(-1) for m in masks]).to(device=collective_device(), dtype=torch.uint8)
    torch.distributed.broadcast(flat, src=0)
    for mask, part in zip(masks, flat.split([m.numel() for m in masks])):
        mask.copy_(part.view(mask.shape).to(device=mask.device, dtype=torch.bool))
