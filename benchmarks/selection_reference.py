"""Round 2's selection, verbatim (commit f992eed, docstrings cut): one flat float32 copy of every score,
``kthvalue`` / ``topk``. The one copy of it: `benchmarks.selection` measures the radix select against it, and
``tests/test_selection_reference.py`` / ``tests/test_selection_memory.py`` compare masks and allocations with it."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

_SAMPLED_ABOVE = 1 << 20  # below this many scores an exact kthvalue is already fast
_SAMPLE_SIZE = 1 << 16


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    n = values.numel()
    if values.device.type != "cpu":
        if k <= n - k + 1:
            return torch.topk(values, k, largest=False, sorted=False).values.max()
        return torch.topk(values, n - k + 1, largest=True, sorted=False).values.min()
    if n < _SAMPLED_ABOVE:
        return torch.kthvalue(values, k).values
    return _bracketed_kth(values, k)


def _bracketed_kth(values: torch.Tensor, k: int) -> torch.Tensor:
    n = values.numel()
    generator = torch.Generator().manual_seed(n)
    sample = values[torch.randint(n, (_SAMPLE_SIZE,), generator=generator)].sort().values
    q = k / n
    margin = 8.0 * math.sqrt(max(q * (1 - q), 1.0 / _SAMPLE_SIZE) / _SAMPLE_SIZE)
    lo_index = math.floor((q - margin) * _SAMPLE_SIZE)
    hi_index = math.ceil((q + margin) * _SAMPLE_SIZE)
    low = sample[lo_index] if lo_index >= 0 else None
    high = sample[hi_index] if hi_index < _SAMPLE_SIZE else None
    inside = torch.ones_like(values, dtype=torch.bool) if low is None else values >= low
    below = n - int(torch.count_nonzero(inside))
    if high is not None:
        inside &= values <= high
    candidates = values[inside]
    rank = k - below
    if 1 <= rank <= candidates.numel():
        return torch.kthvalue(candidates, rank).values
    return torch.kthvalue(values, k).values


def smallest_k_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    n = values.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=values.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=values.device)
    threshold = kth_smallest(values, k)
    mask = values < threshold
    missing = k - int(torch.count_nonzero(mask))
    if missing > 0:
        ties = torch.nonzero(values == threshold).flatten()
        if ties.numel() > missing:  # spread over the tied positions, not the first ones (a whole early layer)
            ties = ties[torch.linspace(0, ties.numel() - 1, missing, device=ties.device).round().long()]
        mask[ties] = True
    return mask


def _clean(score: torch.Tensor, pruned: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    flat = score.detach().reshape(-1)
    if out is None:
        out = torch.empty(flat.numel(), dtype=torch.float32, device=flat.device)
    out.copy_(flat)
    out.nan_to_num_(nan=0.0)
    return out.masked_fill_(pruned.reshape(-1), float("-inf"))


def per_layer_masks(scores: Sequence[torch.Tensor], pruned: Sequence[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    masks = []
    for score, old in zip(scores, pruned):
        k = max(round(sparsity * score.numel()), int(torch.count_nonzero(old)))
        masks.append(smallest_k_mask(_clean(score, old), k).view(score.shape))
    return masks


def global_masks(
    scores: Sequence[torch.Tensor],
    pruned: Sequence[torch.Tensor],
    sparsity: float,
    min_sparsity: float = 0.0,
    max_sparsity: float = 1.0,
) -> list[torch.Tensor]:
    numels = [s.numel() for s in scores]
    total = sum(numels)
    k_total = round(sparsity * total)
    everything = torch.empty(total, dtype=torch.float32, device=scores[0].device) if scores else torch.empty(0)
    flat = list(everything.split(numels))
    for score, old, segment in zip(scores, pruned, flat):
        _clean(score, old, out=segment)
    already = [int(torch.count_nonzero(p)) for p in pruned]
    low = [max(math.ceil(min(min_sparsity, sparsity) * n), a) for n, a in zip(numels, already)]
    high = [max(math.floor(max_sparsity * n), a) for n, a in zip(numels, already)]
    k_total = min(max(k_total, sum(low)), sum(high))

    pinned: dict[int, int] = {}
    free = list(range(len(scores)))
    while free:
        k_free = k_total - sum(pinned.values())
        candidates = everything if len(free) == len(scores) else torch.cat([flat[i] for i in free])
        joint = smallest_k_mask(candidates, k_free)
        counts = [int(c) for c in torch.stack([torch.count_nonzero(part) for part in joint.split([numels[i] for i in free])])]
        over = [i for i, c in zip(free, counts) if c > high[i]]
        under = [i for i, c in zip(free, counts) if c < low[i]]
        if not over and not under:
            break
        for i in over or under:
            pinned[i] = high[i] if over else low[i]
        free = [i for i in free if i not in pinned]

    masks: list[torch.Tensor] = [None] * len(scores)  # type: ignore[list-item]
    if free:
        for i, part in zip(free, joint.split([numels[i] for i in free])):
            masks[i] = part.view(scores[i].shape)
    for i, k in pinned.items():
        masks[i] = smallest_k_mask(flat[i], k).view(scores[i].shape)
    return masks
