"""Saliency mass: how much of a layer's total |theta * grad| the least salient weights hold.

Scores come from a few forward/backward passes (no optimizer step); ``mass(x)`` is the share of the
total score held by the lowest fraction ``x`` of weights. A layer whose lowest 80% hold 2% of its mass
can lose them cheaply; one whose lowest 50% already hold 20% cannot.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

FRACTIONS = tuple(round(0.05 * i, 2) for i in range(1, 20)) + (0.97, 0.99)


def mass_curve(scores: torch.Tensor, fractions: Iterable[float] = FRACTIONS) -> dict[float, float]:
    """``{x: share of sum(scores) held by the floor(x * n) smallest scores}``."""
    flat = scores.detach().flatten().double().abs().sort().values
    total = float(flat.sum())
    cumulative = torch.cat([flat.new_zeros(1), flat.cumsum(0)])
    n = flat.numel()
    return {float(x): (float(cumulative[int(x * n)]) / total if total > 0 else 0.0) for x in fractions}


def removable_fraction(scores: torch.Tensor, max_loss: float) -> float:
    """Largest fraction of weights whose combined score is at most ``max_loss`` of the total."""
    flat = scores.detach().flatten().double().abs().sort().values
    total = float(flat.sum())
    if total == 0.0:
        return 1.0
    cumulative = flat.cumsum(0) / total
    return int(torch.searchsorted(cumulative, torch.tensor(max_loss, dtype=cumulative.dtype), right=True)) / flat.numel()


def mass_tables(scores: Mapping[str, torch.Tensor], groups: Mapping[str, str],
                fractions: Iterable[float] = FRACTIONS) -> dict:
    """Per layer and per layer kind (``groups``: layer -> kind, scores pooled within a kind)."""
    fractions = tuple(fractions)
    per_layer = {n: mass_curve(s, fractions) for n, s in scores.items()}
    pooled: dict[str, list[torch.Tensor]] = {}
    for name, s in scores.items():
        pooled.setdefault(groups[name], []).append(s.flatten())
    per_kind = {k: mass_curve(torch.cat(v), fractions) for k, v in pooled.items()}
    return {"fractions": list(fractions), "per_layer": per_layer, "per_kind": per_kind}


def bottom_overlap(a: torch.Tensor, b: torch.Tensor, fraction: float) -> float:
    """Jaccard overlap of the lowest ``fraction`` of weights by two score estimates (1 = same weights)."""
    k = int(fraction * a.numel())
    if k == 0:
        return 1.0
    ma = torch.zeros(a.numel(), dtype=torch.bool)
    mb = torch.zeros(b.numel(), dtype=torch.bool)
    ma[a.flatten().argsort()[:k]] = True
    mb[b.flatten().argsort()[:k]] = True
    return int((ma & mb).sum()) / int((ma | mb).sum())
