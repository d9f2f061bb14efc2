"""What both mergers share to gather calibration statistics: when, through which hooks, as which rows, summed how.

A merger (:mod:`.merging` for FFN neurons, :mod:`.block_merging` for blocks) folds at a mask update from
statistics of the forward passes of the ``calibration_steps`` optimizer steps just before it. This module owns
the mechanism of such a window, not what is gathered:

* `next_update`: the mask update a window gathers for (None: no hooks now);
* `Hooks`: the hook handles of one window, removed together (the hooks exist only inside a window);
* `rows`: one forward pass's activations as float32 rows, one per token (padding left out where asked);
* `all_reduce_sums`: a window's sums (tensors and Python scalars) summed across ranks, so that every rank folds
  the same correction.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from prune_callbacks.core.distributed import collective_device, is_distributed


def next_update(next_step: int, schedule, steps: int) -> Optional[int]:
    """The first optimizer step among ``next_step .. next_step + steps - 1`` that updates the masks (None: none)."""
    return next((s for s in range(next_step, next_step + steps) if schedule.is_update_step(s)), None)


class Hooks:
    """The hook handles of one calibration window."""

    def __init__(self) -> None:
        self.handles: list = []

    def add(self, handle) -> None:
        self.handles.append(handle)

    def __bool__(self) -> bool:
        return bool(self.handles)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def hidden(output: Any) -> torch.Tensor:
    """A module's hidden states (blocks of some families return a tuple whose first item they are)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def rows(x: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x`` (``[..., features]``) as detached float32 ``[tokens, features]`` rows; with ``keep`` (bool, one per
    token, e.g. a flattened attention mask) only those rows, where it has one entry per row."""
    x = x.detach().reshape(-1, x.shape[-1]).float()
    if keep is not None and keep.numel() == x.shape[0]:
        x = x[keep.to(x.device)]
    return x


def all_reduce_sums(tensors: Sequence[torch.Tensor], scalars: Sequence[float]) -> list[float]:
    """Sum ``tensors`` in place across ranks and return the sums of ``scalars`` (one float64 collective for all of
    them); outside ``torch.distributed``, ``scalars`` unchanged. Every rank must pass the same shapes in the same
    order."""
    if not is_distributed():
        return [float(v) for v in scalars]
    for t in tensors:
        torch.distributed.all_reduce(t)
    if not scalars:
        return []
    flat = torch.tensor([float(v) for v in scalars], dtype=torch.float64, device=collective_device())
    torch.distributed.all_reduce(flat)
    return flat.tolist()
