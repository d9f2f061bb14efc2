"""Merging removed blocks into the kept block before them: ``PruningConfig(merge=...)`` with ``blocks``.

A skipped block's work is lost. The fold keeps what it can: for a run of blocks removed at one
mask update, ending at block ``q``, the kept block ``p`` before the run has its FFN output
projection refitted (ridge least squares on calibration tokens) so that block ``p`` outputs
what block ``q`` output. With ``g`` the input of ``p``'s output projection (``g~ = [g; 1]``
where it has a bias) and ``o = W g + b`` its output, per token:

* **pre-LN** (a block ends in ``stream + o``: GPT-2, Llama, T5, ViT; ``Family.post_norm`` None):
  ``y_p = x + o_p`` is linear in ``o_p``, so the target is ``t = o_p + (y_q - y_p)``;
* **post-LN** (a block ends in ``LN(stream + o)``: BERT, DistilBERT, DeBERTa-v2;
  ``Family.post_norm``): the target is the last removed block's normalised pre-norm sum
  ``n_q`` at block ``p``'s own per-token scale and mean, ``t = o_p + sigma_p n_q + mu_p - z_p``
  (``z`` the norm's input), and ``q``'s norm weight / bias are copied into ``p``'s (the
  per-token affine change is invisible through the norm, which then gives ``y_q``)::

    [W', b'] = [W, b] + E[(t - o) g~^T] (E[g~ g~^T] + lambda I)^-1,    lambda = damping * mean(diag E[g~ g~^T])

(the ridge pulls towards the current projection, so directions the calibration tokens do not
determine keep their weights rather than shrink to 0.)

A run is the blocks an update newly removes, joined through the blocks already removed (which
are skipped, i.e. the identity); ``q`` is its last newly removed block and ``p`` the nearest kept
block before it in the same block list. A run at the start of a block list has no ``p``: it is
dropped (and counted in the report). On MiniLM / Rotten Tomatoes the fold beat dropping after
100 fine-tuning steps at every depth on every seed (+1.4 points at 2 of 6 blocks, +13.5 at 3;
BENCHMARKS.md, "Merge, not only drop, for depth").

When it runs: like the FFN-neuron fold (:mod:`.merging`), at the mask update, between selecting
the new masks and applying them, from statistics gathered by hooks during the forward passes of
the ``calibration_steps`` optimizer steps before the update (:mod:`.block_statistics`: only forward
passes of the whole model are counted, a gradient-checkpointing recomputation in backward is not).
Which blocks an update removes is only known at the update, so statistics are gathered for every
pair ``(p, q)`` the update could fold: ``q`` within ``k`` kept blocks after ``p``, ``k`` the number
of blocks the update removes. Rows are tokens; where the model is called with a 2-D
``attention_mask`` of the tokens' shape, padding tokens are left out (models with one block list;
an encoder-decoder keeps every row). Statistics come from forward passes in whatever mode they run
(training: dropout adds zero-mean noise to the targets).

Cost while armed: per kept block an ``[I+1, I+1]`` Gram matrix and an ``[I+1, H]`` cross term,
and per pair one more ``[I+1, H]`` (float32; MiniLM, 3 of 6 blocks one-shot: 12 pairs, about
100 MB in all; one block per update: about as many pairs as blocks); per forward pass the blocks' ``g`` and
targets of that pass; per fold one ``I+1`` square solve per run (float64 where the device has it).

Where neither form holds (a norm on the FFN output before the residual add: Gemma 2/3, OLMo-2;
post-LN OPT) ``merge`` is refused when the Pruner is built (``Family.fold_refusals``).
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
from torch import nn

from prune_callbacks.core.merge_config import MergeConfig
from prune_callbacks.methods.structured.block_statistics import BlockStatistics, BlockSums, FoldBlock, PairSums
from prune_callbacks.methods.structured.calibration import next_update
from prune_callbacks.methods.structured.ridge import ridge_solve, solve_dtype
from prune_callbacks.methods.structured.units import StructuredUnitsError, block_layout, unit_map

logger = logging.getLogger(__name__)


def blocks_fold_refusal(model: nn.Module) -> Optional[str]:
    """Why ``merge`` with ``granularity='blocks'`` would be refused on ``model`` (the error `BlockMerger` raises),
    or None where its blocks fold; a model whose blocks match no family is refused too."""
    try:
        layout = block_layout(model)
        return _fold_parts(layout, unit_map(model, "blocks", layout=layout))[0]
    except StructuredUnitsError as exc:
        return str(exc)


def _fold_parts(layout, groups) -> tuple[Optional[str], list[tuple]]:
    """``(refusal or None, [(block group, FFN output projection name, post-LN norm name or None)])``: the model's
    flags first (``Family.fold_flag_refusals``), then every block that cannot fold, named in one message."""
    fam = layout.family
    for flag, value, why in fam.fold_flag_refusals:
        if getattr(layout.config, flag, None) == value:
            return (f"merge with granularity='blocks': {flag}={value!r}: {why}; remove merge to drop the blocks "
                    "instead"), []
    parts, offenders = [], []
    for g in groups:
        _, out = layout.ffn_modules(g.block)
        refused = [why for pattern, why in fam.fold_refusals if layout.matches(g.block, pattern)]
        norms = layout.matches(g.block, fam.post_norm)
        why = refused[0] if refused else "no FFN output projection" if out is None else \
            f"no single post-LN norm {fam.post_norm!r}" if fam.post_norm is not None and len(norms) != 1 else None
        if why:
            offenders.append(f"{g.block} ({why})")
        else:
            parts.append((g, out, norms[0] if norms else None))
    if offenders:
        return (f"merge with granularity='blocks' cannot fold these blocks: {'; '.join(offenders)}; remove merge to "
                "drop the blocks instead"), []
    return None, parts


class BlockMerger:
    """Gathers block statistics before mask updates and folds removed blocks into the kept block before them.

    Same contract as `~prune_callbacks.methods.structured.merging.UnitMerger`: the pruning group calls `watch`
    after every optimizer step (and once before the first) and `fold` at every mask update, before the masks apply.
    """

    def __init__(self, model: nn.Module, granularity, config: MergeConfig):
        self.config = config
        self.model = model
        self.granularity = granularity  # the `Blocks` granularity: its masks and `removed_at(sparsity)`
        layout = block_layout(model, family=granularity.family)
        groups = unit_map(model, "blocks", layout=layout)  # every block: one out of the pruning's scope still folds
        refusal, parts = _fold_parts(layout, groups)
        if refusal:
            raise StructuredUnitsError(refusal)
        self.blocks = [FoldBlock(i, layout.stack_of(g.block), g, layout.modules[g.block], layout.modules[out],
                                 layout.modules[norm] if norm else None) for i, (g, out, norm) in enumerate(parts)]
        self.post_ln = layout.family.post_norm is not None
        # the attention mask describes the rows of one block list only (an encoder-decoder's two differ): use it there
        self._mask_rows = len(layout.stacks) == 1
        position = {b.group.block: b.index for b in self.blocks}
        self._scope = [position[g.block] for g in granularity.groups]  # granularity mask i -> block
        self.window: Optional[BlockStatistics] = None
        self.folds: list[dict] = []  # per update: runs folded / dropped and the fit error (mean over runs)

    # ------------------------------------------------------------ arming
    @property
    def armed(self) -> bool:
        return self.window is not None

    def watch(self, next_step: int, schedule) -> None:
        """Collect during the forward passes of optimizer step ``next_step`` iff a mask update falls within the next
        ``calibration_steps`` steps (for the pairs that update can fold: it removes ``k`` more blocks)."""
        update = next_update(next_step, schedule, self.config.calibration_steps)
        if update is not None and self.window is None:
            removed = self._removed(self.granularity.masks)
            removing = self.granularity.removed_at(schedule.value(update)) - sum(removed)
            self.window = BlockStatistics(self.model, self.blocks, self._pairs(removed, max(removing, 1)),
                                          post_ln=self.post_ln, mask_rows=self._mask_rows)
        elif update is None and self.window is not None:
            self.release()

    def _pairs(self, removed: list[bool], removing: int) -> list[tuple[int, int]]:
        """Every ``(p, q)`` an update that removes ``removing`` more blocks could fold: ``p`` kept, ``q`` one of the
        next ``removing`` kept blocks of its block list."""
        pairs = []
        for p in self.blocks:
            if removed[p.index]:
                continue
            later = [q for q in self.blocks[p.index + 1:] if q.stack == p.stack and not removed[q.index]]
            pairs += [(p.index, q.index) for q in later[:removing]]
        return pairs

    # ------------------------------------------------------------ the choice (merge.select)
    @torch.no_grad()
    def choose(self, old: Sequence[torch.Tensor], new: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The masks of this update. ``select='saliency'``: ``new``, the saliency's choice. ``select='fold'``: as many
        newly removed blocks, added one at a time, each the block whose removal makes the runs' summed fold error
        (`_cost`) least; ties and blocks without statistics follow the saliency's order."""
        if self.config.select != "fold":
            return list(new)
        was, now = self._removed(old), self._removed(new)
        count = sum(now) - sum(was)
        if count <= 0 or self.window is None:
            return list(new)
        self.window.all_reduce()
        saliency_first = [i for i in self._scope if now[i] and not was[i]] + [i for i in self._scope if not now[i]]
        chosen = list(was)
        costs: dict = {}
        for _ in range(count):
            def total(b: int) -> float:
                trial = chosen.copy()
                trial[b] = True
                return sum(self._cost(p, q, costs) for p, q in self._runs(was, trial))
            best = min((b for b in saliency_first if not chosen[b]), key=total)
            chosen[best] = True
        return [torch.tensor([chosen[i]], dtype=m.dtype, device=m.device) for i, m in zip(self._scope, new)]

    def _cost(self, p: Optional[int], q: int, cache: dict) -> float:
        """The weighted squared error per token block ``p`` leaves when it takes over the run ending at ``q``
        (infinite where the run cannot be folded: at the start of a block list, or without statistics)."""
        if (p, q) not in cache:
            sums = self._pair(p, q)
            cache[(p, q)] = float("inf") if sums is None else self._fit(self.blocks[p], *sums)[1] / sums[1].count
        return cache[(p, q)]

    # ------------------------------------------------------------ the fold
    @torch.no_grad()
    def fold(self, old: Sequence[torch.Tensor], new: Sequence[torch.Tensor]) -> None:
        """Fold the blocks ``new`` removes and ``old`` did not (the granularity's masks: bool ``[1]`` per block in its
        scope, True = removed) into the kept block before each run, then drop the statistics."""
        was, now = self._removed(old), self._removed(new)
        runs = self._runs(was, now)
        if not runs:
            return
        if self.window is not None:
            self.window.all_reduce()
        folded, dropped, missing, errors = [], [], [], []
        for p, q in runs:
            sums = self._pair(p, q)
            if p is None:
                dropped.append(q)
            elif sums is None:
                missing.append(q)
            else:
                errors.append(self._refit(self.blocks[p], self.blocks[q], *sums))
                folded.append((p, q))
        if missing:
            logger.warning("merge: no calibration statistics for the run(s) ending at block(s) %s at this mask update "
                           "(resumed inside the calibration window?); those blocks are dropped, not merged",
                           ", ".join(self.blocks[q].group.block for q in missing))
        self.folds.append({"runs": [[self.blocks[p].group.block, self.blocks[q].group.block] for p, q in folded],
                           "dropped": [self.blocks[q].group.block for q in dropped + missing],
                           "fit_error": sum(errors) / len(errors) if errors else None})
        self.release()

    def _pair(self, p: Optional[int], q: int) -> Optional[tuple[BlockSums, PairSums]]:
        """The statistics of folding the run ending at ``q`` into ``p``; None where there are none (no kept block
        before the run, no window, or no token seen)."""
        return self.window.pair(p, q) if self.window is not None else None

    def _removed(self, masks: Sequence[torch.Tensor]) -> list[bool]:
        """Per block of the model: removed by ``masks`` (the granularity's, one per block in its scope)."""
        removed = [False] * len(self.blocks)
        for i, m in zip(self._scope, masks):
            removed[i] = bool(m.any())
        return removed

    def _runs(self, was: list[bool], now: list[bool]) -> list[tuple[Optional[int], int]]:
        """``(p, q)`` per run of newly removed blocks (joined through removed ones): ``q`` its last newly removed
        block, ``p`` the kept block before it in the same block list (None at the start of one)."""
        runs: list[tuple[Optional[int], int]] = []
        kept: Optional[int] = None
        current: Optional[int] = None
        stack = None
        for b in self.blocks:
            if b.stack != stack:
                if current is not None:
                    runs.append((kept, current))
                kept, current, stack = None, None, b.stack
            if not now[b.index]:
                if current is not None:
                    runs.append((kept, current))
                    current = None
                kept = b.index
            elif not was[b.index]:
                current = b.index
        if current is not None:
            runs.append((kept, current))
        return runs

    @torch.no_grad()
    def _fit(self, p: FoldBlock, sums: BlockSums, pair: PairSums) -> tuple[torch.Tensor, float, float]:
        """``(solution [I(+1), H], summed weighted squared error on the calibration tokens, summed ||t||^2)`` of
        folding ``pair``'s run into ``p``."""
        dtype = solve_dtype(sums.gram.device)
        gram = sums.gram.to(dtype)
        cross = (sums.own + pair.cross).to(dtype)  # sum g~ t^T
        current = p.in_out().to(device=gram.device, dtype=dtype)
        if p.bias:
            current = torch.cat([current, p.out.bias.to(device=gram.device, dtype=dtype)[None]], 0)
        # the ridge pulls towards the current projection, not towards 0: where the tokens say little, keep it
        solution = current + ridge_solve(gram, cross - gram @ current, self.config.damping)
        energy = sums.own_energy + pair.energy  # sum ||t||^2
        residual = energy - 2 * float((solution * cross).sum()) + float((solution * (gram @ solution)).sum())
        return solution, max(residual, 0.0), energy

    def _refit(self, p: FoldBlock, q: FoldBlock, sums: BlockSums, pair: PairSums) -> float:
        """Replace ``p``'s output projection by the ridge fit to the run's target; return the relative fit error."""
        solution, residual, energy = self._fit(p, sums, pair)
        n_in = solution.shape[0] - (1 if p.bias else 0)
        if pair.count < solution.shape[0]:
            logger.warning("merge: the fold of %s into %s had %d calibration tokens for %d inputs per output; raise "
                           "calibration_steps (or the batch size) for a fit that generalises", q.group.block,
                           p.group.block, pair.count, solution.shape[0])
        weight = p.in_out()
        weight.copy_(solution[:n_in].to(device=weight.device, dtype=weight.dtype))
        if p.bias:
            p.out.bias.copy_(solution[n_in].to(device=p.out.bias.device, dtype=p.out.bias.dtype))
        if p.norm is not None:
            for name in ("weight", "bias"):
                mine, theirs = getattr(p.norm, name, None), getattr(q.norm, name, None)
                if mine is not None and theirs is not None:
                    mine.copy_(theirs)
        return residual / energy if energy > 0 else 0.0

    def release(self) -> None:
        """Remove the hooks and drop the statistics."""
        if self.window is not None:
            self.window.remove()
            self.window = None

    def report(self) -> dict:
        errors = [f["fit_error"] for f in self.folds if f["fit_error"] is not None]
        return {"merge": {"select": self.config.select, "updates": len(self.folds),
                          "blocks": sum(len(f["runs"]) for f in self.folds),
                          "runs": [r for f in self.folds for r in f["runs"]],
                          "dropped": [d for f in self.folds for d in f["dropped"]],
                          "fit_error": [round(e, 4) for e in errors]}}
