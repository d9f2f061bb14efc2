"""Choosing exactly which weights to prune from their scores.

The pruned count is exact: ``k`` weights are pruned, the lowest-scoring ones,
ties broken by position so every process and every rerun picks the same
weights: of ``t`` tied candidates for ``m`` places, evenly spaced positions are
taken (not the first ``m``, which would empty one early layer). Scores are
cleaned on the fly (NaN counts as 0, already-pruned weights as ``-inf``, first
in line) and never copied into one flat buffer: the threshold is found by a
radix select over the float32 bit patterns, a few passes over the tensors in
place with one small histogram per pass (:mod:`.selection_radix`). Transient
memory is chunks, histograms and the candidates of the threshold's bin (capped);
the masks returned are the only full-size allocation.

Sharded scores (the reducer contract). Every histogram and count that is summed
goes through a :class:`Reducer`: :class:`LocalReducer` (the default, one
process) or :class:`ProcessGroupReducer` (``torch.distributed.all_reduce``).
With a process-group reducer, each ``scores[i]`` / ``pruned[i]`` is this
rank's LOCAL part of target ``i``: a contiguous block of its flattened
elements, blocks in rank order (FSDP2 shards dim 0 into row blocks: rank ``r``
holds rows ``[r * ceil(R / W), min(R, (r + 1) * ceil(R / W)))``, possibly
none), as a plain tensor (e.g. ``DTensor.to_local()``), all on one device.
``global_numels[i]`` is the unsharded target's numel (counts, ``k`` and caps
use it; checked against the local numels summed over ranks). Every rank calls
with the same targets in the same order and the same settings; each gets back
the masks of its own blocks, and the masks concatenated in rank order are
bitwise the masks a single process computes from the unsharded scores (ties
ordered by target, then rank, then local flat index = the global flat index).
Collectives per call: one small all-reduce of the counts; per batch of up to
16 groups (global scope: one group of all uncapped targets per water-filling
round, then one per capped target; per-layer scope: one per target) two
histograms of ``[groups, 65536]`` int32 counts (256 KiB per group) and, if
tied scores are split, one ``[world_size, targets]`` matrix of tie counts; one
of the pruned counts per target.
"""

from __future__ import annotations

import math
from typing import Optional, Protocol, Sequence

import torch

from prune_callbacks.methods.selection_radix import Source, key_to_float, radix_thresholds, select_smallest


class Reducer(Protocol):
    """Sums tensors across the processes that hold the shards of the same targets."""

    rank: int
    world_size: int

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce SUM in place; returns ``tensor``."""
        ...


class LocalReducer:
    """One process: the sum over one process is the tensor itself."""

    rank = 0
    world_size = 1

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


class ProcessGroupReducer:
    """``torch.distributed.all_reduce`` over ``group`` (the default group when None); ranks are group ranks."""

    def __init__(self, group=None):
        import torch.distributed as dist

        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor


LOCAL = LocalReducer()


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest value (1-based) of a flat tensor, as a 0-d tensor of its dtype.

    Exact for float32 (and narrower) values with ``1 <= k <= numel`` and no NaN; ``-0.0`` and ``0.0`` are equal
    (either may come back as ``0.0``).
    """
    (found,) = radix_thresholds([Source.of(values)], [[0]], [k], LOCAL, values.device)
    return torch.tensor(key_to_float(found.key), dtype=values.dtype, device=values.device)


def smallest_k_mask(values: torch.Tensor, k: int, *, reducer: Optional[Reducer] = None,
                    global_numel: Optional[int] = None) -> torch.Tensor:
    """Boolean mask of the ``k`` smallest entries of flat ``values`` (ties: evenly spaced positions).

    NaN counts as 0. With a process-group ``reducer``, ``values`` is this rank's block of the flat tensor
    (blocks in rank order), ``k`` and ``global_numel`` are global.
    """
    reducer = reducer or LOCAL
    numel = values.numel() if global_numel is None else global_numel
    (mask,), _ = select_smallest([Source.of(values)], [[0]], [k], [numel], reducer)
    return mask


def _clean(score: torch.Tensor, pruned: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Flat float32 scores (into ``out`` if given) with NaN as 0 and already-pruned weights first in line."""
    flat = score.detach().reshape(-1)
    if out is None:
        out = torch.empty(flat.numel(), dtype=torch.float32, device=flat.device)
    out.copy_(flat)
    out.nan_to_num_(nan=0.0)
    return out.masked_fill_(pruned.reshape(-1), float("-inf"))


def _prepare(scores, pruned, reducer, global_numels):
    """Sources, global numels and global already-pruned counts (one all-reduce when sharded)."""
    if len(scores) != len(pruned):
        raise ValueError(f"{len(scores)} score tensors but {len(pruned)} pruned masks")
    sources = [Source.of(s, p, clamp_inf=True) for s, p in zip(scores, pruned)]
    local = [s.numel for s in sources]
    numels = list(local) if global_numels is None else [int(n) for n in global_numels]
    if len(numels) != len(sources):
        raise ValueError(f"{len(sources)} score tensors but {len(numels)} global_numels")
    device = scores[0].device if scores else torch.device("cpu")
    already_local = [torch.count_nonzero(s.pruned) for s in sources]
    if reducer.world_size == 1:
        if numels != local:
            raise ValueError(f"global_numels={numels} differ from the score numels {local} on one process")
        return sources, numels, [int(a) for a in already_local]
    both = torch.stack([torch.tensor(local, dtype=torch.int64, device=device),
                        torch.stack(already_local).to(torch.int64)]) if sources else torch.zeros(2, 0, dtype=torch.int64)
    total, already = reducer.sum_(both).cpu().tolist()
    if total != numels:
        raise ValueError(f"global_numels={numels} but the local score numels sum to {total} over the "
                         f"{reducer.world_size} ranks")
    return sources, numels, already


def per_layer_masks(scores: Sequence[torch.Tensor], pruned: Sequence[torch.Tensor], sparsity: float, *,
                    reducer: Optional[Reducer] = None,
                    global_numels: Optional[Sequence[int]] = None) -> list[torch.Tensor]:
    """Prune ``round(sparsity * numel)`` weights in every target, never fewer than already pruned.

    ``reducer`` / ``global_numels``: local shards, see the module docstring.
    """
    reducer = reducer or LOCAL
    sources, numels, already = _prepare(scores, pruned, reducer, global_numels)
    ks = [max(round(sparsity * n), a) for n, a in zip(numels, already)]
    masks, _ = select_smallest(sources, [[i] for i in range(len(sources))], ks, numels, reducer)
    return [m.view(s.shape) for m, s in zip(masks, scores)]


def global_masks(
    scores: Sequence[torch.Tensor],
    pruned: Sequence[torch.Tensor],
    sparsity: float,
    min_sparsity: float = 0.0,
    max_sparsity: float = 1.0,
    *,
    reducer: Optional[Reducer] = None,
    global_numels: Optional[Sequence[int]] = None,
) -> list[torch.Tensor]:
    """One threshold over all targets, pruning ``round(sparsity * total)`` weights.

    With caps, targets whose share would fall outside ``[min, max]`` are pinned
    to the cap and the threshold is recomputed over the rest (water-filling);
    the total stays exact. ``min`` is itself capped by the current ``sparsity``.
    ``reducer`` / ``global_numels``: local shards, see the module docstring.
    """
    reducer = reducer or LOCAL
    sources, numels, already = _prepare(scores, pruned, reducer, global_numels)
    total = sum(numels)
    k_total = round(sparsity * total)
    low = [max(math.ceil(min(min_sparsity, sparsity) * n), a) for n, a in zip(numels, already)]
    high = [max(math.floor(max_sparsity * n), a) for n, a in zip(numels, already)]
    k_total = min(max(k_total, sum(low)), sum(high))

    pinned: dict[int, int] = {}
    free = list(range(len(scores)))
    masks: list[torch.Tensor] = [None] * len(scores)  # type: ignore[list-item]
    while free:
        k_free = k_total - sum(pinned.values())
        joint, counts = select_smallest(sources, [free], [k_free], numels, reducer)
        over = [i for i in free if counts[i] > high[i]]
        under = [i for i in free if counts[i] < low[i]]
        if not over and not under:
            for i in free:
                masks[i] = joint[i]
            break
        for i in over or under:
            pinned[i] = high[i] if over else low[i]
        free = [i for i in free if i not in pinned]
    if pinned:
        order = sorted(pinned)
        alone, _ = select_smallest(sources, [[i] for i in order], [pinned[i] for i in order], numels, reducer)
        for i in order:
            masks[i] = alone[i]
    return [m.view(s.shape) for m, s in zip(masks, scores)]

