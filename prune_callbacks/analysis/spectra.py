"""Singular-value spectra of weight matrices: how much rank each matrix really uses."""

from __future__ import annotations

import math

import torch

ENERGY_LEVELS = (0.90, 0.95, 0.99)


def spectrum_stats(matrix: torch.Tensor) -> dict:
    """Figures of one 2-D weight: effective rank (exp of the entropy of the normalised singular values),
    stable rank (||W||_F^2 / ||W||_2^2), ranks holding 90/95/99% of the energy (sum of s^2) and the
    break-even rank mn/(m+n) below which a rank-r factorisation saves parameters."""
    if matrix.dim() != 2:
        raise ValueError(f"spectrum_stats needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    m, n = matrix.shape
    s = torch.linalg.svdvals(matrix.detach().double())
    energy = s.pow(2)
    total = float(energy.sum())
    out = {"shape": [m, n], "full_rank": min(m, n), "break_even_rank": m * n / (m + n)}
    if total == 0.0:
        out.update(effective_rank=0.0, stable_rank=0.0, **{f"rank_{int(p * 100)}": 0 for p in ENERGY_LEVELS},
                   singular_values=[])
        return out
    p = s / s.sum()
    p = p[p > 0]
    out["effective_rank"] = float(math.exp(float(-(p * p.log()).sum())))
    out["stable_rank"] = total / float(energy[0])
    cumulative = energy.cumsum(0) / total
    for level in ENERGY_LEVELS:
        out[f"rank_{int(level * 100)}"] = int(torch.searchsorted(cumulative, torch.tensor(level - 1e-12, dtype=cumulative.dtype))) + 1
    out["singular_values"] = [float(v) for v in s]
    return out


def spectra(weights: dict[str, torch.Tensor]) -> dict[str, dict]:
    """``{name: spectrum_stats}`` for each matrix (Conv1D weights are (in, out): rank is the same)."""
    return {name: spectrum_stats(w) for name, w in weights.items()}


def low_rank_candidates(stats: dict[str, dict], level: str = "rank_95") -> list[str]:
    """Matrices whose rank holding the energy ``level`` is below the break-even rank."""
    return [n for n, s in stats.items() if s[level] and s[level] < s["break_even_rank"]]
