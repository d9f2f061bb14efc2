"""N:M granularity: N weights kept in every group of M consecutive weights along the input dimension.

``granularity="2:4"`` is the pattern NVIDIA's sparse tensor cores run (see
:func:`prune_callbacks.export.semi_structured.to_semi_structured`); any ``N:M`` with
``0 < N < M`` is accepted. The final sparsity is ``1 - N/M``.

The path there is gradual, driven by the group's schedule. At an update for
sparsity ``s`` each target prunes ``round(s * numel)`` weights (the same
fraction in every target), chosen by saliency among *candidates*: in every
group of M, its ``M - N`` lowest-scoring weights (already-pruned ones count
first). So every intermediate mask is a subset of a valid N:M mask, no group
ever loses more than ``M - N`` weights, and at ``s = 1 - N/M`` every candidate
is pruned: exactly N:M in every group. Why this path rather than ramping the
per-group count (0 -> 1 -> 2 of 4): the count per group can only move in steps
of ``1/M``, which would turn the cubic ramp into ``M - N`` one-shot jumps;
choosing among candidates follows the schedule at the resolution of single
weights while keeping the end state exact.
"""

from __future__ import annotations

from prune_callbacks.core.registry import register_granularity
from prune_callbacks.methods.selection import _clean, per_layer_masks
from prune_callbacks.methods.sharding import is_sharded
from prune_callbacks.methods.granularity.base import Granularity


@register_granularity("N:M", pattern=r"(\d+):(\d+)")
class NM(Granularity):
    name = "N:M"

    def __init__(self, config, targets, model=None, n: str = "2", m: str = "4"):
        self.n, self.m = int(n), int(m)
        super().__init__(config, targets, model)

    @classmethod
    def fixed_final_sparsity(cls, n="2", m="4"):
        return 1.0 - int(n) / int(m)

    @classmethod
    def check_config(cls, config, n="2", m="4"):
        n, m = int(n), int(m)
        if not 0 < n < m:
            return [f"granularity={config.granularity!r} is invalid: N:M needs 0 < N < M (e.g. '2:4', '4:8')"]
        return []

    def _input_rows(self, tensor, target):
        """View with the input dimension last: Linear is [out, in]; GPT-2's Conv1D is [in, out]."""
        return tensor.t() if target.transposed else tensor

    def check_targets(self):
        crossing = [t.param_name for t in self.targets if t.transposed and is_sharded(t.param)]
        if crossing:  # Conv1D is [in, out]: FSDP2's dim-0 shards would cut groups along the input dimension
            raise NotImplementedError(
                f"granularity={self.n}:{self.m} on FSDP2-sharded GPT-2 Conv1D weights ({', '.join(crossing[:3])}): "
                "their input dimension is the sharded one, so groups of M could straddle two ranks"
            )
        bad = []
        for t in self.targets:
            fan_in = t.param.shape[0] if t.transposed else t.param.shape[-1]
            if fan_in % self.m:
                bad.append(f"{t.param_name} (input dimension {fan_in})")
        if bad:
            raise ValueError(
                f"granularity={self.n}:{self.m} needs every target's input dimension to be a multiple of {self.m}; "
                f"these are not: {', '.join(bad)}. Leave them out with exclude=[...] (or choose include=[...] "
                "patterns that skip them), or use another M"
            )

    def candidates(self, clean_scores, target, shape=None):
        """Bool mask (weight-shaped) of each group's ``M - N`` lowest scores (ties: lower position first).

        ``shape``: the tensor's shape as this rank holds it (FSDP2: its rows; groups run along the input
        dimension, which dim-0 sharding keeps whole on one rank)."""
        rows = self._input_rows(clean_scores.view(shape if shape is not None else target.param.shape), target)
        grouped = rows.reshape(-1, self.m)
        order = grouped.argsort(dim=-1, stable=True)[:, : self.m - self.n]
        chosen = grouped.new_zeros(grouped.shape, dtype=bool).scatter_(1, order, True)
        chosen = chosen.view(rows.shape)
        return (chosen.t() if target.transposed else chosen).reshape(-1)

    def select(self, scores, sparsity):
        """``round(s * numel)`` per target among the candidates: the per-layer selection of scores in which
        non-candidates rank last. Every group has exactly ``M - N`` candidates, so capping ``s`` at ``1 - N/M``
        caps every target's count at its number of candidates."""
        return self.select_among(scores, sparsity, self.masks)

    def select_among(self, scores, sparsity, pruned):
        """`select` given which positions count as already pruned (``pruned``: they rank first in their group
        and are never unpruned; all-False masks choose afresh, as ``N:M-srste`` does)."""
        limited = []
        for score, old, target in zip(scores, pruned, self.targets):
            flat = _clean(score, old)  # already pruned = -inf: first in their group and first overall
            flat.masked_fill_(~self.candidates(flat, target, score.shape), float("inf"))
            limited.append(flat.view(score.shape))
        sparsity = min(sparsity, self.fixed_final_sparsity(self.n, self.m))
        return per_layer_masks(limited, pruned, sparsity, reducer=self.layout.reducer,
                               global_numels=list(self.layout.numels))

    def report(self):
        return {"n": self.n, "m": self.m}

    def groups_kept(self, mask, target):
        """Kept weights per group of M (for tests and reports)."""
        rows = self._input_rows(~mask, target)
        return rows.reshape(-1, self.m).sum(-1)
