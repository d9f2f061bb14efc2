"""Structured granularities: ``ffn_neurons``, ``attention_heads`` (KV groups), ``blocks``.

A unit spans slices of several tensors (:mod:`prune_callbacks.methods.structured.units`), so
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
  family table (:mod:`prune_callbacks.core.families`), or from ``config.units``
  for the user's own model (:mod:`prune_callbacks.core.unit_description`), validated
  here, before training.

Combine kinds with several configs (``Pruner(model, [ffn_config, blocks_config])``):
each group selects on its own; a removed block takes its neurons and heads with it
when slimming, and the width counts are per block, so the remaining blocks are
uniform. ``report()`` gives units kept per block. After training,
:func:`prune_callbacks.export.slim_pruned` cuts the units out.

* **FSDP2** (:mod:`prune_callbacks.methods.sharding`): each rank sums the scores of its rows per unit
  (a unit's rows may straddle two ranks), one all-reduce per update adds the partial sums, so every
  rank selects the same units; masks are applied to the local rows. ``blocks`` is refused.

Note for the sparsity report: rows are per spanned weight; two groups spanning the
same weight (FFN neurons + blocks) both count it.
"""

from __future__ import annotations

from typing import ClassVar, Optional, Sequence

import torch

from prune_callbacks.core.config_errors import PruningConfigError
from prune_callbacks.core.registry import register_granularity
from prune_callbacks.core.report import zero_count
from prune_callbacks.methods.sharding import local
from prune_callbacks.methods.structured.masking import skip_block, zero_units
from prune_callbacks.methods.structured.units import StructuredUnitsError, block_layout, unit_map
from prune_callbacks.core.targets import Target, is_linear_like, is_transposed
from prune_callbacks.methods.granularity.base import Granularity


class StructuredUnits(Granularity):
    """Base of the structured granularities; ``kind`` names the unit (see the module docstring)."""

    name = "structured"
    kind: ClassVar[str] = ""
    elementwise = False
    config_fields = frozenset({"units"})
    weight_access = "units"
    export_as = "slim"  # cut the units out (prune_callbacks.export.slim_pruned.slim_granularities)
    unit_scored = True  # takes one score per unit: a unit-level saliency ('unit_taylor') selects through select_units
    supports_sharding = True  # FSDP2: partial unit sums on local rows, one all-reduce per update

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
    def _local(self, span):
        """``(tensor, first global row)`` of ``span``'s parameter as this rank holds it (see ``zero_units``)."""
        i = self._index[id(span.param)]
        return local(self.sources[i]), self.layout.rows[i]

    def _span_sums(self, span, score: torch.Tensor, n_units: int, first: int) -> torch.Tensor:
        """Per unit, the sum of ``score`` (this rank's rows of ``span``'s parameter) over the unit's slices."""
        whole = tuple(score.shape) == tuple(span.param.shape)
        if span.dim != 0 or whole:
            return span.unit_view(score.view(span.param.shape) if whole else score, n_units).sum(1)
        rows = score.shape[0]  # dim-0 units on a row shard: each local row adds to its own unit
        out = torch.zeros(n_units, dtype=score.dtype, device=score.device)
        if rows:
            unit_of_row = (torch.arange(rows, device=score.device) + first) // span.size
            out.index_add_(0, unit_of_row, score.reshape(rows, -1).sum(1))
        return out

    def unit_scores(self, scores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per group, the summed per-weight score of each unit (float32, ``[n_units]``); under FSDP2 every
        rank sums its rows and one all-reduce adds the partial sums of all groups."""
        out = []
        for g in self.groups:
            total = torch.zeros(g.n_units, dtype=torch.float32, device=g.spans[0].param.device)
            for s in g.spans:
                i = self._index[id(s.param)]
                score = scores[i].detach().float()
                total += self._span_sums(s, score, g.n_units, self.layout.rows[i]).to(total.device)
            out.append(total)
        if self.layout.sharded and out:
            flat = torch.cat(out)
            self.layout.reducer.sum_(flat)
            out = list(flat.split([g.n_units for g in self.groups]))
        return out

    @property
    def units_per_group(self) -> list[int]:
        """How many units each group in scope has (the length of its mask)."""
        return [g.n_units for g in self.groups]

    def select(self, scores, sparsity):
        return self.select_units(self.unit_scores(scores), sparsity)

    def select_units(self, per_group: Sequence[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
        """Masks from one score per unit (``[n_units]`` per group, as `unit_scores` gives, or a unit-level
        saliency's own buffers), lowest first, uniform per block."""
        masks = []
        for g, score, old in zip(self.groups, per_group, self.masks):
            k = max(units_removed(sparsity, g.n_units), int(old.sum()))  # old <= n - 1: the same cap
            masks.append(_lowest(score, old, k))
        return masks

    #: what one unit is called in messages, and over what the count runs
    unit_words: ClassVar[tuple[str, str]] = ("units", " per block")

    def _unit_counts(self) -> list[int]:
        return sorted({g.n_units for g in self.groups})

    def describe_target(self, sparsity: float) -> Optional[str]:
        if sparsity <= 0:
            return None
        plural, over = self.unit_words
        parts = []
        for n in self._unit_counts():
            k = units_removed(sparsity, n)
            if k == 0 and n == 1:
                raise PruningConfigError(
                    f"final_sparsity={sparsity!r}: granularity={self.config.granularity!r} has 1 {plural[:-1]}"
                    f"{over} in scope and keeps at least one, so nothing can be removed; widen include/exclude",
                    [("final_sparsity", f"1 {plural[:-1]} in scope")])
            if k == 0:
                raise PruningConfigError(
                    f"final_sparsity={sparsity!r} rounds to 0 of {n} {plural}{over} (round(final_sparsity * {n})), "
                    f"so granularity={self.config.granularity!r} would remove nothing; the smallest value that "
                    f"removes one is 1/{n} = {1 / n:.4g} (anything above {0.5 / n:.4g} rounds to 1)",
                    [("final_sparsity", f"rounds to 0 of {n} {plural}")])
            parts.append(f"{k} of {n} {plural}{over}")
        return f"final_sparsity {sparsity:g} -> {', '.join(parts)}"

    # ------------------------------------------------------------ masks
    @torch.no_grad()
    def apply(self) -> None:
        for g, pruned in zip(self.groups, self.masks):
            zero_units(g, pruned, self._local)

    @torch.no_grad()
    def finalize(self) -> None:
        """Masks permanent: every spanned slice of a pruned unit is written +0.0 (``index_fill_``) once more."""
        self.apply()

    def keep(self) -> list[torch.Tensor]:
        """``True`` = **kept** (slim's convention: the complement of ``masks``, where ``True`` = pruned), one bool
        tensor per unit group of the model (groups out of scope keep everything)."""
        mine = {g.mask_name: ~m.cpu() for g, m in zip(self.groups, self.masks)}
        return [mine.get(g.mask_name, torch.ones(g.n_units, dtype=torch.bool))
                for g in unit_map(self.model, self.kind, family=self.family)]

    # ------------------------------------------------------------ reporting
    def counts(self, measured: bool = False):
        """This rank's rows (the whole weights unless FSDP2-sharded; the group sums ranks)."""
        rows = []
        for g, pruned in zip(self.groups, self.masks):
            n_pruned = int(pruned.sum())
            for s in g.spans:
                if s.param_name != "weight" or s.module not in self._projections:
                    continue
                tensor, first = self._local(s)
                numel = tensor.numel()
                if measured:
                    rows.append((s.module, numel, zero_count(tensor)))
                elif s.dim is None:
                    rows.append((s.module, numel, numel if n_pruned else 0))
                elif s.dim == 0 and tuple(tensor.shape) != tuple(s.param.shape):  # a row shard
                    unit_of_row = (torch.arange(tensor.shape[0]) + first) // s.size
                    per_row = numel // tensor.shape[0] if tensor.shape[0] else 0
                    rows.append((s.module, numel, int(pruned.cpu()[unit_of_row].sum()) * per_row))
                else:
                    rows.append((s.module, numel, n_pruned * s.size * (numel // tensor.shape[s.dim])))
        return rows

    def report(self) -> dict:
        return {
            "units": self.kind,
            "units_per_block": self.units_per_group,
            "kept_per_block": {g.label: int((~m).sum()) for g, m in zip(self.groups, self.masks)},
        }


def units_removed(sparsity: float, n: int) -> int:
    """Units removed out of ``n`` at ``sparsity``: ``round(sparsity * n)``, at most ``n - 1`` (the one rounding rule)."""
    return min(round(sparsity * n), n - 1)


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
    unit_words = ("FFN neurons", " per block")
    config_fields = StructuredUnits.config_fields | {"merge"}  # prune_callbacks.methods.structured.merging


@register_granularity("attention_heads")
class AttentionHeads(StructuredUnits):
    """One unit = one KV group with its query heads (Llama-family; one head without GQA)."""

    name = "attention_heads"
    kind = "attention_heads"
    unit_words = ("KV groups", " per block")


@register_granularity("blocks")
class Blocks(StructuredUnits):
    """One unit = one whole block; ``final_sparsity`` is the fraction of blocks removed."""

    name = "blocks"
    kind = "blocks"
    unit_words = ("blocks", "")

    def _unit_counts(self) -> list[int]:
        return [len(self.groups)]

    #: the share of the run advised after the last block is removed (BENCHMARKS.md, "The 3x plan in the full setting")
    RECOVERY_SHARE: ClassVar[float] = 0.3

    def schedule_advice(self, last_update: int, total_steps: int) -> Optional[str]:
        left = (total_steps - last_update) / total_steps
        if left >= self.RECOVERY_SHARE:
            return None
        return (f"granularity='blocks': the last block is removed at step {last_update} of {total_steps}, leaving "
                f"{left:.0%} of the run to recover from it; a model that loses whole blocks needs a fine-tune at a "
                f"useful learning rate afterwards (MiniLM, 3 of 6 blocks, 1,600 steps with a decaying learning rate: "
                f"end_step 0.6 kept 94% of dense accuracy, 0.8 fell to 69%); end the schedule (end_step, or the "
                f"start_step of a oneshot cut) by {1 - self.RECOVERY_SHARE:g} of the run")

    supports_sharding = False  # a removed block is skipped by a forward hook, not tested beside FSDP2's own hooks
    config_fields = StructuredUnits.config_fields | {"merge"}  # prune_callbacks.methods.structured.block_merging

    @classmethod
    def final_sparsity_hint(cls, value, *args: str) -> Optional[str]:
        """``final_sparsity`` is a fraction of the blocks, never a count: ``2`` is refused with what to give."""
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 1:
            k = int(value) if float(value).is_integer() else value
            return (f"final_sparsity={value!r} is invalid for granularity='blocks': it is the fraction of blocks "
                    "removed (round(final_sparsity * number of blocks), at most all but one), not a count; "
                    f"to remove {k} of n blocks give {k}/n (e.g. {k} of 12 blocks: {round(value / 12, 4)})")
        return None

    def removed_at(self, sparsity: float) -> int:
        """Blocks removed at ``sparsity`` (the one rounding rule, `units_removed`)."""
        return units_removed(sparsity, len(self.groups))

    def select_units(self, per_group, sparsity):
        per_block = torch.cat([s.cpu() for s in per_group])
        old = torch.cat([m.cpu() for m in self.masks])
        k = max(self.removed_at(sparsity), int(old.sum()))
        chosen = _lowest(per_block, old, k)
        return [chosen[i : i + 1].to(m.device) for i, m in enumerate(self.masks)]

    @torch.no_grad()
    def apply(self) -> None:
        super().apply()
        for g, pruned in zip(self.groups, self.masks):
            skip_block(self._blocks[g.block], bool(pruned.any()))

    def needs_slim_to_save(self) -> bool:
        """Removed blocks still in the model: they are skipped by a forward hook, which a saved model does not
        keep (``BLOCKS_WITHOUT_SLIM``); after slimming they are gone."""
        removed = [self._blocks[g.block] for g, m in zip(self.groups, self.masks) if bool(m.any())]
        if not removed:
            return False
        present = {id(m) for m in self.model.modules()}
        return any(id(b) in present for b in removed)

    def keep(self) -> list[bool]:
        """``True`` = **kept** block (slim's convention; ``masks`` say pruned)."""
        pruned = {g.layer: bool(m.any()) for g, m in zip(self.groups, self.masks)}
        return [not pruned.get(i, False) for i in range(self.n_blocks)]

    def report(self) -> dict:
        return {"units": "blocks", "blocks": self.n_blocks,
                "kept_blocks": [i for i, kept in enumerate(self.keep()) if kept]}
