"""Where a targeted weight lives: a whole tensor, or this rank's rows of an FSDP2-sharded one.

FSDP2 (``torch.distributed.fsdp.fully_shard``) turns every parameter into a
``DTensor`` sharded on dim 0 over a one-dimensional device mesh: rank ``r`` holds
a contiguous block of rows, in rank order (``torch.chunk``: the last ranks may
hold fewer rows, or none). The pruner only ever works on that block. This module
owns the three facts the rest of the engine needs about it, so no other module
tests for ``DTensor``:

* :func:`local` / :func:`local_grad`: the tensor (and gradient) the step sees,
  this rank's rows; an alias of the parameter's storage, so writing a mask into
  it writes the weight the optimizer updates (never a stale copy, never a
  full-size mask);
* :class:`ShardLayout`: per target the *global* numel and the flat offset of the
  local block in the whole tensor (positions, hence ties, are global);
* the *reducer* of the process group the shards live on (``rank``,
  ``world_size``, ``sum_(tensor)``: an in-place all-reduce SUM), which the
  selection uses to sum its histograms and the engine to agree on decisions
  and counts; on whole tensors it is the identity (:class:`LocalReducer`).

What is refused, with the reason (:func:`check_shardable`): FSDP1 flat parameters,
tensor parallelism (any placement other than ``Shard(0)``), HSDP / 2-D meshes and
DeepSpeed ZeRO-3 partitions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from prune_callbacks.methods.selection import LocalReducer, ProcessGroupReducer


try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch built without distributed
    _DTensor = ()


def is_sharded(param: Any) -> bool:
    """Whether ``param`` is a DTensor (FSDP2, TP): its data is spread over processes."""
    return isinstance(param, _DTensor)


def local(param: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``param`` as a plain tensor sharing its storage (the whole tensor if not sharded)."""
    if not is_sharded(param):
        return param
    with torch.no_grad():
        return param.to_local()


def local_grad(param: torch.Tensor) -> Optional[torch.Tensor]:
    """This rank's part of ``param.grad`` (None when there is no gradient)."""
    grad = param.grad
    if grad is None or not is_sharded(grad):
        return grad
    return grad.to_local()


def _offset_rows(param: torch.Tensor) -> int:
    """First global row of this rank's block (DTensor's own arithmetic, not a second copy of it)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return int(offset[0])


def _refusal(param: torch.Tensor) -> Optional[str]:
    """Why ``param`` cannot be pruned from its local shard (None: it can)."""
    kind = type(param).__name__
    if hasattr(param, "ds_id") or hasattr(param, "ds_numel"):
        return "a DeepSpeed ZeRO-3 partition"
    if kind == "FlatParameter" or getattr(param, "_is_flat_param", False):
        return "an FSDP1 FlatParameter (use FSDP2: fully_shard, or fsdp_version: 2)"
    if not is_sharded(param):
        return None if param.dim() >= 2 else "flattened (1-D)"
    from torch.distributed.tensor import Shard

    placements = tuple(param.placements)
    if param.device_mesh.ndim != 1:
        return f"on a {param.device_mesh.ndim}-D device mesh (HSDP / FSDP+TP: placements {placements})"
    if placements != (Shard(0),):
        return f"placed {placements} (tensor parallel; FSDP2 shards dim 0 only)"
    if param.dim() < 2:
        return "flattened (1-D)"
    return None


def check_shardable(named_params: Sequence[tuple[str, torch.Tensor]]) -> None:
    """Raise ``NotImplementedError`` naming every parameter that is sharded in a way the pruner cannot follow,
    and ``ValueError`` when sharded targets live on different process groups."""
    from prune_callbacks.core.targets import _preview

    offenders = [f"{n} ({why})" for n, p in named_params if (why := _refusal(p)) is not None]
    if offenders:
        raise NotImplementedError(
            "these targets are sharded in a way the pruner does not support: "
            f"{_preview(offenders, 4)}. Supported: whole tensors (single process, DDP) and FSDP2 "
            "(fully_shard: DTensor Shard(0) on a 1-D mesh); DeepSpeed ZeRO-3 and tensor parallelism are refused."
        )
    # fully_shard without a mesh argument builds a mesh per call: equal ranks mean one process group
    meshes = {(p.device_mesh.device_type, tuple(p.device_mesh.mesh.flatten().tolist())) for _, p in named_params
              if is_sharded(p)}
    if len(meshes) > 1:
        raise ValueError("the targets are sharded over different device meshes; shard the whole model with one mesh")
    if meshes and len(meshes) == 1 and len([p for _, p in named_params if is_sharded(p)]) != len(named_params):
        whole = [n for n, p in named_params if not is_sharded(p)]
        raise ValueError(f"some targets are sharded (FSDP2) and some are not: {_preview(whole, 4)}; apply fully_shard "
                         "to the whole model (or exclude them)")


@dataclass(frozen=True)
class ShardLayout:
    """Where each tracked tensor's local block sits in the whole tensor, and who to sum with.

    ``numels[i]``: the global numel of tensor ``i``; ``offsets[i]``: the flat position of
    its first local element in the whole tensor (row-major); ``reducer``: see the module
    docstring. A layout of whole tensors has offsets 0 and the identity reducer.
    """

    numels: tuple[int, ...]
    offsets: tuple[int, ...]
    reducer: Any
    sharded: bool
    rows: tuple[int, ...] = ()  # the global index of each tensor's first local row (dim 0)

    @property
    def world_size(self) -> int:
        return int(self.reducer.world_size)

    def sum_counts(self, counts: Sequence[int], device: Any = "cpu") -> list[int]:
        """``counts`` summed over ranks (one all-reduce of an int64 vector; identity when whole)."""
        if not self.sharded or not counts:
            return [int(c) for c in counts]
        t = torch.tensor([int(c) for c in counts], dtype=torch.int64, device=device)
        self.reducer.sum_(t)
        return [int(c) for c in t.tolist()]

    def all_true(self, flag: bool, device: Any = "cpu") -> bool:
        """Whether ``flag`` holds on every rank (one all-reduce of one number)."""
        if not self.sharded:
            return bool(flag)
        return self.sum_counts([0 if flag else 1], device)[0] == 0

    def gather_values(self, values: Sequence[float], device: Any = "cpu") -> list[list[float]]:
        """Every rank's ``values`` (a few floats), rank by rank: a zero-padded sum, so only ``sum_`` is needed."""
        if not self.sharded:
            return [list(map(float, values))]
        n = len(values)
        t = torch.zeros(self.world_size * n, dtype=torch.float64, device=device)
        t[self.reducer.rank * n:(self.reducer.rank + 1) * n] = torch.tensor(list(values), dtype=torch.float64)
        self.reducer.sum_(t)
        return [t[r * n:(r + 1) * n].tolist() for r in range(self.world_size)]


def layout_of(params: Sequence[torch.Tensor]) -> ShardLayout:
    """The `ShardLayout` of ``params`` (call `check_shardable` first)."""
    sharded = [p for p in params if is_sharded(p)]
    if not sharded:
        return ShardLayout(tuple(p.numel() for p in params), (0,) * len(params), LocalReducer(), False,
                           (0,) * len(params))
    reducer = ProcessGroupReducer(sharded[0].device_mesh.get_group())
    rows = tuple(_offset_rows(p) if is_sharded(p) else 0 for p in params)
    offsets = tuple(r * math.prod(p.shape[1:]) for r, p in zip(rows, params))
    return ShardLayout(tuple(p.numel() for p in params), offsets, reducer, True, rows)


def local_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes this rank holds in ``tensors`` (per-rank pruning memory)."""
    return sum(t.numel() * t.element_size() for t in tensors)
