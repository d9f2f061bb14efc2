"""Structured granularities: ``ffn_neurons``, ``attention_heads`` (KV groups), ``blocks``.

A unit spans slices of several tensors (:mod:`prune_callbacks.structured.units`), so
here ``params`` are every tensor the units span (weights *and* biases) and ``masks``
are one bool per unit (``[n_units]`` per block, ``True`` = pruned).

* **Saliency**: the engine's per-weight score of each spanned tensor (by default the
  Taylor EMA of ``|theta * grad|``) summed over the unit's slices.
* **Selection** (width kinds): *uniform per block*: at sparsity ``s`` every block in
  scope prunes ``round(s * n_units)`` of its units (at most ``n_units - 1``), its
  lowest-scoring ones, so a plain config describes the slimmed model. Already pruned
  units stay pruned. ``blocks``: ``final_sparsity`` is the *fraction of blocks*
  removed (``round(s * n_blocks)``, at most ``n_blocks - 1``), lowest-scoring first;
  a count (``final_sparsity: 2``) is refused at config time with the fraction to give.
* **Masks** are applied to every spanned slice after every optimizer step (+0.0), so
  removed units contribute exactly zero; a removed block is also skipped by a forward
  hook (its input passes through), which is what cutting it does.
* **Scope**: ``include`` / ``exclude`` choose blocks: a block's width units are in scope
  when every weight they span is a target; a block is in scope for ``blocks`` when
  any of its weights is. Blocks out of scope keep all their units (slimming then
  refuses, since the width is no longer uniform, unless those blocks are removed).
* ``attention_heads`` needs a config with a head size of its own (``head_dim``, T5
  ``d_kv``); BERT/GPT-2/OPT/DistilBERT/DeBERTa-v2 are refused when the `Pruner` is built (the
  architecture is unknown at config time). Which tensors a unit spans is read from the
  family table (:mod:`prune_callbacks.structured.families`), or from ``config.units``
  for the user's own model (:mod:`prune_callbacks.structured.description`), validated
  here, before training.

Combine kinds with several configs (``Pruner(model, [ffn_config, blocks_config])``):
each group selects on its own; a removed block takes its neurons and heads with it
when slimming, and the width counts are per block, so the remaining blocks are
uniform. ``report()`` gives units kept per block. After training,
:func:`prune_callbacks.structured.slim_pruned` cuts the units out.

Note for the sparsity report: rows are per spanned weight; two groups spanning the
same weight (FFN neurons + blocks) both count it.
"""

from __future__ import annotations

from typing import ClassVar, Optional, Sequence

import torch

from ..registry import register_granularity
from ..structured.masking import skip_block, zero_units
from ..structured.units import StructuredUnitsError, block_layout, unit_map
from ..targets import Target, is_linear_like, is_transposed
from .base import Granularity


class StructuredUnits(Granularity):
    """Base of the structured granularities; ``kind`` names the unit (see the module docstring)."""

    name = "structured"
    kind: ClassVar[str] = ""
    elementwise = False
    config_fields = frozenset({"units"})

    def __init__(self, config, targets, model=None, *args: str):
        if model is None:
            raise ValueError(f"granularity={self.kind!r} needs the model (to find its units)")
        self.config = config
        self.model = model
        units = getattr(config, "units", None)
        self.family = units.to_family() if units is not None else None
        targeted = {t.name for t in targets}
        layout = block_layout(model, family=self.family)
        self._blocks = {g: layout.modules[g] for g in layout.blocks}
        self.n_blocks = len(layout.blocks)
        groups = unit_map(model, self.kind, layout=layout)
        modules = layout.modules

        def projections(g):  # the Linear / Conv1D weights a unit spans (what include/exclude select)
            return [s.module for s in g.spans if s.param_name == "weight" and is_linear_like(modules[s.module])]

        if self.kind == "blocks":
            in_scope = [g for g in groups if any(m in targeted for m in projections(g))]
        else:
            in_scope = [g for g in groups if all(m in targeted for m in projections(g))]
        if not in_scope:
            needed = sorted(set(projections(groups[0])))
            raise StructuredUnitsError(
                f"granularity={self.kind!r}: no block is in scope; include/exclude must select every weight a unit "
                f"spans (in block 0: {', '.join(needed)})"
            )
        self.groups = in_scope
        seen, params, weights = set(), [], []
        for g in self.groups:
            for s in g.spans:
                if id(s.param) not in seen:
                    seen.add(id(s.param))
                    params.append(s.param)
                    if s.param_name == "weight" and is_linear_like(modules[s.module]):
                        weights.append(Target(s.module, s.param, is_transposed(modules[s.module])))
        self.targets = weights
        self._projections = {t.name for t in weights}
        self.params = params
        self._index = {id(p): i for i, p in enumerate(params)}
        self.masks = [torch.zeros(g.n_units, dtype=torch.bool, device=g.spans[0].param.device) for g in self.groups]

    @property
    def mask_names(self) -> list[str]:
        return [g.mask_name for g in self.groups]

    # ------------------------------------------------------------ scores and selection
    def unit_scores(self, scores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per group, the summed per-weight score of each unit (float32, ``[n_units]``)."""
        out = []
        for g in self.groups:
            total = torch.zeros(g.n_units, dtype=torch.float32, device=g.spans[0].param.device)
            for s in g.spans:
                score = scores[self._index[id(s.param)]].detach().float().view(s.param.shape)
                total += s.unit_view(score, g.n_units).sum(1).to(total.device)
            out.append(total)
        return out

    def select(self, scores, sparsity):
        per_group = self.unit_scores(scores)
        masks = []
        for g, score, old in zip(self.groups, per_group, self.masks):
            k = min(max(round(sparsity * g.n_units), int(old.sum())), g.n_units - 1)
            masks.append(_lowest(score, old, k))
        return masks

    # ------------------------------------------------------------ masks
    @torch.no_grad()
    def apply(self) -> None:
        for g, pruned in zip(self.groups, self.masks):
            zero_units(g, pruned)

    @torch.no_grad()
    def finalize(self) -> None:
        """Masks permanent: every spanned slice of a pruned unit is written +0.0 (``index_fill_``) once more."""
        self.apply()

    def keep(self) -> list[torch.Tensor]:
        """``True`` = kept, one bool tensor per unit group of the model (groups out of scope keep everything)."""
        mine = {g.mask_name: ~m.cpu() for g, m in zip(self.groups, self.masks)}
        return [mine.get(g.mask_name, torch.ones(g.n_units, dtype=torch.bool))
                for g in unit_map(self.model, self.kind, family=self.family)]

    # ------------------------------------------------------------ reporting
    def counts(self, measured: bool = False):
        rows = []
        for g, pruned in zip(self.groups, self.masks):
            n_pruned = int(pruned.sum())
            for s in g.spans:
                if s.param_name != "weight" or s.module not in self._projections:
                    continue
                numel = s.param.numel()
                if measured:
                    rows.append((s.module, numel, numel - int(torch.count_nonzero(s.param))))
                elif s.dim is None:
                    rows.append((s.module, numel, numel if n_pruned else 0))
                else:
                    rows.append((s.module, numel, n_pruned * s.size * (numel // s.param.shape[s.dim])))
        return rows

    def report(self) -> dict:
        return {
            "units": self.kind,
            "units_per_block": [g.n_units for g in self.groups],
            "kept_per_block": {g.label: int((~m).sum()) for g, m in zip(self.groups, self.masks)},
        }


def _lowest(score: torch.Tensor, old: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` lowest scores, already-pruned first (ties: lower index first)."""
    score = score.clone()
    score[old] = float("-inf")
    mask = torch.zeros_like(old)
    if k > 0:
        mask[torch.argsort(score, stable=True)[:k]] = True
    return mask


@register_granularity("ffn_neurons")
class FFNNeurons(StructuredUnits):
    """One unit = one intermediate neuron of a block's feed-forward network."""

    name = "ffn_neurons"
    kind = "ffn_neurons"
    config_fields = StructuredUnits.config_fields | {"merge"}  # prune_callbacks.structured.merging


@register_granularity("attention_heads")
class AttentionHeads(StructuredUnits):
    """One unit = one KV group with its query heads (Llama-family; one head without GQA)."""

    name = "attention_heads"
    kind = "attention_heads"


@register_granularity("blocks")
class Blocks(StructuredUnits):
    """One unit = one whole block; ``final_sparsity`` is the fraction of blocks removed."""

    name = "blocks"
    kind = "blocks"

    @classmethod
    def final_sparsity_hint(cls, value, *args: str) -> Optional[str]:
        """``final_sparsity`` is a fraction of the blocks, never a count: ``2`` is refused with what to give."""
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 1:
            k = int(value) if float(value).is_integer() else value
            return (f"final_sparsity={value!r} is invalid for granularity='blocks': it is the fraction of blocks "
                    "removed (round(final_sparsity * number of blocks), at most all but one), not a count; "
                    f"to remove {k} of n blocks give {k}/n (e.g. {k} of 12 blocks: {round(value / 12, 4)})")
        return None

    def select(self, scores, sparsity):
        per_block = torch.cat([s.cpu() for s in self.unit_scores(scores)])
        old = torch.cat([m.cpu() for m in self.masks])
        n = len(self.groups)
        k = min(max(round(sparsity * n), int(old.sum())), n - 1)
        chosen = _lowest(per_block, old, k)
        return [chosen[i : i + 1].to(m.device) for i, m in enumerate(self.masks)]

    @torch.no_grad()
    def apply(self) -> None:
        super().apply()
        for g, pruned in zip(self.groups, self.masks):
            skip_block(self._blocks[g.block], bool(pruned.any()))

    def keep(self) -> list[bool]:
        pruned = {g.layer: bool(m.any()) for g, m in zip(self.groups, self.masks)}
        return [not pruned.get(i, False) for i in range(self.n_blocks)]

    def report(self) -> dict:
        return {"units": "blocks", "blocks": self.n_blocks,
                "kept_blocks": [i for i, kept in enumerate(self.keep()) if kept]}
