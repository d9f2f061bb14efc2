"""Merging removed FFN neurons into the kept ones: ``PruningConfig(merge=...)`` with ``ffn_neurons``.

Dropping a neuron deletes what it wrote into the residual stream. Merging folds that into
what stays, by a ridge least-squares refit of the block's FFN output projection on
calibration activations (FLAP's bias compensation generalised to weights; neuron merging
à la Kim et al. 2020 is the special case of a removed neuron that copies a kept one). With
``h`` the input of the output projection (one row per token), ``K`` the kept neurons,
``R`` the ones a mask update removes and ``h~_K = [h_K; 1]`` where the projection has a
bias::

    [D, d] = W_R . E[h_R h~_K^T] . (E[h~_K h~_K^T] + lambda I)^-1,    W_K += D,   bias += d

which minimises ``E || W_R h_R - (D h_K + d) ||^2`` (+ ridge): the best linear prediction of
the removed neurons' output from the kept ones. ``lambda = damping * mean(diag E[h~_K h~_K^T])``.

When it runs: during training the structured masks zero a removed neuron's input rows, so
its ``h`` is 0 from then on and there is nothing left to fold afterwards (``slim`` only cuts
zeros). The fold therefore happens *at the mask update* (`UnitMerger.fold`, called by the
pruning group between selecting the new masks and applying them), from the second moments
of ``h`` gathered by a forward pre-hook on every output projection during the
``calibration_steps`` optimizer steps just before each update (every forward pass of those
steps, gradient-accumulation micro-steps included; the hooks exist only then: the window's
mechanism, shared with the block fold, is :mod:`.calibration`; the solve, :mod:`.ridge`). Where
updates follow each other closer than ``calibration_steps`` (a gradual schedule), the window
stays open from ``calibration_steps`` before the first of them to the last, and every fold uses
all its tokens so far: a fold changes the output projection, not its inputs ``h``, so the
statistics stay valid (the removed neurons' ``h`` is 0 from then on). Dropping them at each fold
left SmolLM2 (``update_every`` 2) 512 tokens for 1,152+ inputs per fit. The one-shot schedule is
the same thing once: prune at ``start_step``, refit, fine-tune on.

Cost: while armed, per block an ``[I, I]`` float32 Gram matrix (``I`` intermediate neurons:
MiniLM 1536 -> 9.4 MB per block, 57 MB for 6 blocks; Llama-7B 11008 -> 485 MB per block) on
the weights' device, and one ``addmm`` of ``I^2 * tokens`` per block and forward pass; per
update one ``|K|+1`` square solve per block (float64 where the device has it). Nothing is
kept once the window closes. Under ``torch.distributed`` the statistics are all-reduced first, so
every rank folds the same correction (and keeps a ``1 / world`` share for the window's next update).

``ffn_neurons`` here; removed blocks fold into the kept block before them in
:mod:`.block_merging`; a removed head would need its attention output refit the same way (not
built). Which tensors a neuron spans, and which module is the output projection,
come from the unit description (`unit_map` / `BlockLayout.ffn_modules`), never from
per-architecture code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from prune_callbacks.core.distributed import is_distributed
from prune_callbacks.core.merge_config import MergeConfig  # noqa: F401 (re-exported)
from prune_callbacks.methods.structured.calibration import Hooks, all_reduce_sums, next_update, rows
from prune_callbacks.methods.structured.ridge import damped, ridge_solve, solve_dtype
from prune_callbacks.methods.structured.units import Span, StructuredUnitsError, UnitGroup, block_layout

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------ the math (one block)
def _moments(gram: torch.Tensor, total: torch.Tensor, count: float, bias: bool) -> torch.Tensor:
    """``E[h~ h~^T]`` in the solve dtype: ``gram / count``, with the ones column ``h~ = [h; 1]`` (index ``I``) appended
    where the projection has a bias."""
    dtype = solve_dtype(gram.device)
    n = max(float(count), 1.0)
    e = gram.to(dtype) / n
    if bias:
        mean = total.to(dtype) / n
        e = torch.cat([torch.cat([e, mean[:, None]], 1), torch.cat([mean, mean.new_ones(1)])[None]], 0)
    return e


def _with_ones(index: torch.Tensor, width: int) -> torch.Tensor:
    """``index`` and the ones column of `_moments` (index ``width``)."""
    return torch.cat([index, index.new_full((1,), width)])


@torch.no_grad()
def least_squares_fold(w_removed: torch.Tensor, gram: torch.Tensor, total: torch.Tensor, count: float,
                       removed: torch.Tensor, kept: torch.Tensor, *, bias: bool, damping: float
                       ) -> tuple[torch.Tensor, Optional[torch.Tensor], float]:
    """``(D, d, recovered)`` for one block (see the module docstring).

    ``w_removed``: ``[out, |R|]`` output columns of the removed features; ``gram`` ``[I, I]`` = sum of ``h h^T``,
    ``total`` ``[I]`` = sum of ``h``, over ``count`` rows; ``removed`` / ``kept``: feature indices. ``D`` is
    ``[out, |K|]``, ``d`` ``[out]`` (None without ``bias``); ``recovered``: the fraction of the removed features'
    output energy ``E||W_R h_R||^2`` the fold puts back (1 = the layer's output is unchanged on this data).
    """
    e = _moments(gram, total, count, bias)
    if bias:
        kept = _with_ones(kept, gram.shape[0])
    w = w_removed.to(e.dtype)
    a = e.index_select(0, kept).index_select(1, kept)
    c = e.index_select(0, removed).index_select(1, kept)  # E[h_R h~_K^T]
    b = w @ c  # [out, |K~|]
    fold = ridge_solve(a, b.T, damping).T
    energy = float((w @ e.index_select(0, removed).index_select(1, removed) * w).sum())
    residual = energy - 2 * float((fold * b).sum()) + float((fold @ a * fold).sum())
    recovered = 1.0 - residual / energy if energy > 0 else 1.0
    if bias:
        return fold[:, :-1], fold[:, -1], recovered
    return fold, None, recovered


@torch.no_grad()
def fold_choice(columns: torch.Tensor, gram: torch.Tensor, total: torch.Tensor, count: float, features: torch.Tensor,
                k: int, *, bias: bool, damping: float) -> torch.Tensor:
    """Positions (into ``features``) of the ``k`` features whose removal, each folded into the rest, errs least.

    Optimal brain surgeon over the features of one output projection, greedily: with ``A`` the damped second
    moments of the candidate inputs (and the ones column where there is a bias, never removed), removing feature
    ``j`` and refitting the others costs ``||W_j||^2 / [A^-1]_jj``; the cheapest goes, ``W`` takes its fold and
    ``A^-1`` its downdate, and so on ``k`` times. ``columns``: ``[out, len(features)]`` the weight's columns of the
    candidates; ``gram`` / ``total`` / ``count`` as in `least_squares_fold`. The fold itself is then
    `least_squares_fold` on the chosen set (the same solution, in exact arithmetic).
    """
    e = _moments(gram, total, count, bias)
    dtype = e.dtype
    index = _with_ones(features, gram.shape[0]) if bias else features
    w = columns.to(device=gram.device, dtype=dtype, copy=True)  # updated in place below
    if bias:
        w = torch.cat([w, w.new_zeros(len(w), 1)], 1)
    inv = torch.linalg.inv(damped(e.index_select(0, index).index_select(1, index), damping))
    norms = (w * w).sum(0)  # ||W_j||^2, kept current below
    gone = torch.zeros(len(index), dtype=torch.bool, device=e.device)
    if bias:
        gone[-1] = True  # the ones column stays
    picked = []
    for _ in range(k):
        cost = norms.clamp_min(0) / inv.diagonal().clamp_min(torch.finfo(dtype).tiny)
        cost[gone] = float("inf")
        j = int(torch.argmin(cost))
        root = float(inv[j, j]) ** 0.5
        u, v = inv[:, j] / root, w[:, j] / root  # W -= v u^T (the fold), A^-1 -= u u^T (the downdate)
        norms += u * (u * float(v @ v) - 2 * (v @ w))
        w.addr_(v, u, alpha=-1)
        inv.addr_(u, u, alpha=-1)
        gone[j] = True
        picked.append(j)
    return torch.tensor(sorted(picked), dtype=torch.long)


# ------------------------------------------------------------------ statistics
@dataclass
class _Block:
    group: UnitGroup
    module: nn.Module  # the FFN output projection
    span: Span  # its weight's span (one input feature per neuron)
    gram: Optional[torch.Tensor] = None
    total: Optional[torch.Tensor] = None
    count: float = 0  # tokens (a 1 / world share of the summed count between updates under torch.distributed)

    def columns(self) -> torch.Tensor:
        """The output projection's weight as an ``[out, I]`` view (one column per input feature)."""
        return self.span.param.movedim(self.span.dim, -1)

    def collect(self, module, args) -> None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor):
            return
        h = rows(x)
        if self.gram is None:
            self.gram = torch.zeros(h.shape[1], h.shape[1], dtype=torch.float32, device=h.device)
            self.total = torch.zeros(h.shape[1], dtype=torch.float32, device=h.device)
        self.gram.addmm_(h.T, h)
        self.total += h.sum(0)
        self.count += h.shape[0]

    def reset(self) -> None:
        self.gram = self.total = None
        self.count = 0


class UnitMerger:
    """Gathers FFN output-projection statistics before mask updates and folds removed neurons into kept ones.

    Owned by a pruning group (:mod:`prune_callbacks.methods.steps.pruning`), which calls `watch` after every optimizer
    step (and once before the first) and `choose`, then `fold`, at every mask update, before the masks are applied.
    """

    def __init__(self, model: nn.Module, groups: Sequence[UnitGroup], config: MergeConfig, family=None):
        self.config = config
        layout = block_layout(model, family=family)
        self.blocks: list[_Block] = []
        for g in groups:
            _, out = layout.ffn_modules(g.block)
            span = next((s for s in g.spans if s.module == out and s.param_name == "weight"), None)
            if span is None or span.dim is None or span.size != 1:
                raise StructuredUnitsError(
                    f"merge: block {g.block!r} has no FFN output projection with one input feature per neuron "
                    f"(found {out!r}); merge needs one (remove merge to drop the neurons instead)")
            self.blocks.append(_Block(g, layout.modules[out], span))
        self.hooks = Hooks()  # one forward pre-hook per output projection, inside a calibration window only
        self._reduced = False  # the statistics are summed across ranks (between `choose` and `fold`)
        self.folds: list[dict] = []  # per update: neurons folded, output energy recovered (mean), tokens (fewest)

    @property
    def armed(self) -> bool:
        return bool(self.hooks)

    def watch(self, next_step: int, schedule) -> None:
        """Collect during the forward passes of optimizer step ``next_step`` iff a mask update falls within the
        next ``calibration_steps`` steps."""
        soon = next_update(next_step, schedule, self.config.calibration_steps) is not None
        if soon and not self.hooks:
            for b in self.blocks:
                self.hooks.add(b.module.register_forward_pre_hook(b.collect))
        elif not soon and self.hooks:
            self.release()

    def choose(self, old: Sequence[torch.Tensor], new: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        """The masks of this update. ``select='saliency'``: ``new``, the saliency's choice. ``select='fold'``: in each
        block as many newly removed neurons as the saliency removes there, chosen by their fold (`fold_choice`)
        from this window's statistics; a block without statistics keeps the saliency's choice."""
        if self.config.select != "fold":
            return new
        self._all_reduce()
        chosen = []
        for b, was, now in zip(self.blocks, old, new):
            count = int(now.sum()) - int(was.sum())
            if count <= 0 or b.count == 0:
                chosen.append(now)
                continue
            candidates = (~was).nonzero().reshape(-1)
            features = b.span.unit_index(candidates).to(b.gram.device)
            columns = b.columns().index_select(1, features.to(b.span.param.device))
            picked = fold_choice(columns, b.gram, b.total, b.count, features, count, damping=self.config.damping,
                                 bias=getattr(b.module, "bias", None) is not None)
            mask = was.clone()
            mask[candidates[picked.to(candidates.device)]] = True
            chosen.append(mask)
        return chosen

    @torch.no_grad()
    def fold(self, old: Sequence[torch.Tensor], new: Sequence[torch.Tensor]) -> None:
        """Fold the neurons ``new`` prunes and ``old`` did not (bool ``[n_units]`` per group, True = pruned) into the
        kept ones of their block. The statistics stay for the window's next update (a fold changes the output
        projection, not its inputs; the removed neurons' inputs are 0 from now on); `watch` drops them when the
        window closes. Without statistics (an update outside the watched window, e.g. after resuming mid-window) the
        neurons are dropped, with a warning."""
        self._all_reduce()
        recovered, tokens, folded, missing, short = [], [], 0, 0, []
        for b, was, now in zip(self.blocks, old, new):
            removed_units = (now & ~was).nonzero().reshape(-1)
            if removed_units.numel() == 0:
                continue
            if b.count == 0:
                missing += 1
                continue
            kept_units = (~now).nonzero().reshape(-1)
            removed, kept = b.span.unit_index(removed_units), b.span.unit_index(kept_units)
            if b.count <= kept.numel():
                short.append((b.group.block, b.count, kept.numel() + 1))
            weight = b.span.param
            columns = b.columns()
            bias = getattr(b.module, "bias", None)
            delta, shift, rec = least_squares_fold(
                columns.index_select(1, removed.to(weight.device)), b.gram, b.total, b.count,
                removed.to(b.gram.device), kept.to(b.gram.device), bias=bias is not None,
                damping=self.config.damping)
            columns.index_add_(1, kept.to(weight.device), delta.to(device=weight.device, dtype=weight.dtype))
            if shift is not None:
                bias.add_(shift.to(device=bias.device, dtype=bias.dtype))
            recovered.append(rec)
            tokens.append(b.count)
            folded += int(removed_units.numel())
        if missing:
            logger.warning("merge: %d block(s) had no calibration statistics at this mask update (resumed inside the "
                           "calibration window?); their removed neurons are dropped, not merged", missing)
        if short:
            block, seen, inputs = short[0]
            logger.warning("merge: %d block(s) were refit from fewer calibration tokens than inputs (%s: %d tokens for "
                           "%d inputs): such a fit can follow noise; raise calibration_steps (or the batch size)",
                           len(short), block, seen, inputs)
        if folded:
            self.folds.append({"neurons": folded, "recovered": sum(recovered) / len(recovered), "tokens": min(tokens)})
        self._share()

    def _all_reduce(self) -> None:
        """Sum the statistics across ranks, once per update (`choose`, then `fold`; `_share` re-opens it)."""
        if not is_distributed() or self._reduced:
            return
        self._reduced = True
        for b in self.blocks:  # every rank must have the tensors: zeros where a rank saw nothing
            width = b.span.param.shape[b.span.dim]
            device = b.span.param.device
            if b.gram is None:
                b.gram = torch.zeros(width, width, device=device)
                b.total = torch.zeros(width, device=device)
        counts = all_reduce_sums([t for b in self.blocks for t in (b.gram, b.total)], [b.count for b in self.blocks])
        for b, count in zip(self.blocks, counts):
            b.count = count

    def _share(self) -> None:
        """After a fold under ``torch.distributed`` every rank holds the summed statistics; keep a ``1 / world``
        share of them, so that the next update's all-reduce adds the window's new tokens to them once, not once per
        rank."""
        if not is_distributed():
            return
        self._reduced = False
        world = torch.distributed.get_world_size()
        for b in self.blocks:
            if b.gram is not None:
                b.gram /= world
                b.total /= world
                b.count /= world

    def release(self) -> None:
        """Remove the hooks and drop the statistics (the window closed, or the group is finalized)."""
        self.hooks.remove()
        self._reduced = False
        for b in self.blocks:
            b.reset()

    def report(self) -> dict:
        return {"merge": {"select": self.config.select, "updates": len(self.folds),
                          "neurons": sum(f["neurons"] for f in self.folds),
                          "recovered": [round(f["recovered"], 4) for f in self.folds],
                          "tokens": [round(f["tokens"]) for f in self.folds]}}
