"""The statistics a block fold is fitted from: one calibration window's hooks, per-pass state and sums.

:mod:`.block_merging` folds the run of blocks an update removes, ending at block ``q``, into the kept
block ``p`` before it by refitting ``p``'s FFN output projection to a target ``t`` per token (see
there). Everything the fit needs is a sum over the window's tokens, gathered here for every pair
``(p, q)`` the update could fold:

* per source block ``p`` (`BlockSums`): ``sum g~ g~^T`` (``gram``), ``sum g~ u^T`` (``own``),
  ``sum ||u||^2`` and the token count, where ``g~`` is the input of ``p``'s output projection (with a
  ones column where it has a bias) and ``u`` the part of ``p``'s target it owns itself;
* per pair (`PairSums`): ``sum (w g~) v_q^T`` (``cross``) and the rest of ``sum ||t||^2``, where
  ``t = u_p + w_p v_q`` and ``v_q`` is what block ``q`` would have handed on (``y_q`` pre-LN, the
  normalised pre-norm sum ``n_q`` post-LN).

Every row (token) is divided by the scale the next norm divides it by (pre-LN: the stream's RMS;
post-LN: the norm's sigma), so that the fit's error is measured as the next block sees it. Only
forward passes of the whole model count (a model forward hook brackets them: a gradient-checkpointing
recomputation in backward is not counted twice); padding rows are left out where the model is called
with a 2-D ``attention_mask`` of the tokens' shape and ``mask_rows`` is set. The hooks are
:mod:`.calibration`'s (`Hooks`), removed with the window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from prune_callbacks.core.targets import is_transposed
from prune_callbacks.methods.structured.calibration import Hooks, all_reduce_sums, hidden, rows
from prune_callbacks.methods.structured.units import UnitGroup


@dataclass
class FoldBlock:
    """One block as the fold sees it: its FFN output projection and (post-LN) the norm that ends it."""

    index: int  # position in the merger's block list
    stack: str  # the block list it belongs to
    group: UnitGroup
    block: nn.Module
    out: nn.Module  # the FFN output projection
    norm: Optional[nn.Module]  # post-LN: the norm that ends the block

    @property
    def bias(self) -> bool:
        return getattr(self.out, "bias", None) is not None

    def in_out(self) -> torch.Tensor:
        """The output projection's weight as an ``[I, H]`` view (Linear stores ``[H, I]``, GPT-2 Conv1D ``[I, H]``)."""
        return self.out.weight if is_transposed(self.out) else self.out.weight.T


@dataclass
class _Pass:
    """What one forward pass showed of a block (rows already divided by their scale where noted)."""

    g: Optional[torch.Tensor] = None  # [rows, I(+1)] the projection's input (a ones column where it has a bias), / scale
    o: Optional[torch.Tensor] = None  # [rows, H] its output
    u: Optional[torch.Tensor] = None  # [rows, H] the target's own part: o - y (pre-LN) or o + mu - z (post-LN), / scale
    w: Optional[torch.Tensor] = None  # [rows, 1] the factor of the other block's part (1 pre-LN, sigma post-LN), / scale
    v: Optional[torch.Tensor] = None  # [rows, H] this block's part of a target ending here: y or n


@dataclass
class BlockSums:
    """A source block's sums over the window."""

    gram: torch.Tensor  # sum g~ g~^T
    own: torch.Tensor  # sum g~ u^T
    own_energy: float = 0.0  # sum ||u||^2
    count: int = 0


@dataclass
class PairSums:
    """A pair's sums over the window."""

    cross: torch.Tensor  # sum (w g~) v_q^T
    energy: float = 0.0  # sum 2 u_p . (w v_q) + ||w v_q||^2: with the block's own_energy, sum ||t||^2
    count: int = 0


class BlockStatistics:
    """One calibration window: hooks on ``model`` and on the blocks of ``pairs``, and the sums they gather."""

    def __init__(self, model: nn.Module, blocks: list[FoldBlock], pairs: Iterable[tuple[int, int]], *,
                 post_ln: bool, mask_rows: bool):
        self.blocks = blocks
        self.post_ln = post_ln
        self.mask_rows = mask_rows
        pairs = list(pairs)
        kept = sorted({p for p, _ in pairs})  # the blocks a fold would refit: their projection's sums
        ends = sorted({q for _, q in pairs})  # the blocks whose output a fold would take over
        self.sums: dict[int, BlockSums] = {}
        for i in kept:
            n_in, width = self._shape(blocks[i])
            self.sums[i] = BlockSums(blocks[i].out.weight.new_zeros(n_in, n_in, dtype=torch.float32),
                                     blocks[i].out.weight.new_zeros(n_in, width, dtype=torch.float32))
        self.pairs = {(p, q): PairSums(blocks[p].out.weight.new_zeros(*self._shape(blocks[p]), dtype=torch.float32))
                      for p, q in pairs}
        self.reduced = False  # the sums were all-reduced (choose, then fold, at one update)
        self._passes: dict[int, _Pass] = {}
        self._rows: Optional[torch.Tensor] = None  # bool [rows] tokens kept this pass (None: all)
        self._active = False  # inside a forward pass of the whole model
        self.hooks = Hooks()
        self.hooks.add(model.register_forward_pre_hook(self._begin, with_kwargs=True))
        self.hooks.add(model.register_forward_hook(self._end))
        for i in sorted(set(kept) | set(ends)):
            b = blocks[i]
            if i in self.sums:
                self.hooks.add(b.out.register_forward_pre_hook(lambda m, a, b=b: self._ffn_in(b, a)))
                self.hooks.add(b.out.register_forward_hook(lambda m, a, o, b=b: self._ffn_out(b, o)))
            if post_ln:
                self.hooks.add(b.norm.register_forward_pre_hook(lambda m, a, b=b: self._norm_in(b, a[0])))
            else:
                self.hooks.add(b.block.register_forward_hook(lambda m, a, o, b=b: self._block_out(b, hidden(o))))

    @staticmethod
    def _shape(b: FoldBlock) -> tuple[int, int]:
        inputs, width = b.in_out().shape
        return inputs + (1 if b.bias else 0), width

    def pair(self, p: Optional[int], q: int) -> Optional[tuple[BlockSums, PairSums]]:
        """The sums of folding the run ending at ``q`` into ``p``; None where there are none (no kept block before
        the run, a pair this window did not watch, or no token seen)."""
        pair = self.pairs.get((p, q)) if p is not None else None
        if pair is None or not pair.count or not self.sums[p].count:
            return None
        return self.sums[p], pair

    def all_reduce(self) -> None:
        """Sum the window across ranks, once (every rank ran the same forward passes over its own data)."""
        if self.reduced:
            return
        self.reduced = True
        sums, pairs = list(self.sums.values()), list(self.pairs.values())
        tensors = [t for s in sums for t in (s.gram, s.own)] + [pair.cross for pair in pairs]
        values = iter(all_reduce_sums(tensors, [v for s in sums for v in (s.own_energy, s.count)] +
                                      [v for pair in pairs for v in (pair.energy, pair.count)]))
        for s in sums:
            s.own_energy, s.count = next(values), int(next(values))
        for pair in pairs:
            pair.energy, pair.count = next(values), int(next(values))

    def remove(self) -> None:
        self.hooks.remove()
        self._passes = {}

    # ------------------------------------------------------------ hooks (one forward pass)
    def _begin(self, module, args, kwargs) -> None:
        self._active = True
        mask = kwargs.get("attention_mask") if self.mask_rows else None
        self._rows = mask.reshape(-1).bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _end(self, module, args, output) -> None:
        self._active = False
        self._rows = None
        self._passes = {}

    def _state(self, b: FoldBlock) -> _Pass:
        return self._passes.setdefault(b.index, _Pass())

    def _ffn_in(self, b: FoldBlock, args) -> None:
        if not self._active or not args or not isinstance(args[0], torch.Tensor):
            return
        g = rows(args[0], self._rows)
        self._state(b).g = torch.cat([g, g.new_ones(len(g), 1)], 1) if b.bias else g

    def _ffn_out(self, b: FoldBlock, output) -> None:
        state = self._passes.get(b.index)
        if self._active and state is not None and state.g is not None:
            state.o = rows(hidden(output), self._rows)

    def _block_out(self, b: FoldBlock, y: torch.Tensor) -> None:  # pre-LN: y = stream + o
        if not self._active or not isinstance(y, torch.Tensor):
            return
        y = rows(y, self._rows)
        state = self._state(b)
        if state.o is not None:  # rows weighted by the stream's per-token RMS: the next block normalises it
            self._own(b, state, state.o - y, torch.ones(len(y), 1, device=y.device),
                      y.pow(2).mean(-1, keepdim=True).sqrt())
        state.v = y
        self._targets(b)

    def _norm_in(self, b: FoldBlock, z: torch.Tensor) -> None:  # post-LN: y = norm(z), z = stream + o
        if not self._active or not isinstance(z, torch.Tensor):
            return
        z = rows(z, self._rows)
        eps = float(getattr(b.norm, "eps", getattr(b.norm, "variance_epsilon", 1e-5)))
        mu = z.mean(-1, keepdim=True)
        sigma = (z.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
        state = self._state(b)
        if state.o is not None:  # rows weighted by 1 / sigma: the fit's error as the norm's output sees it
            self._own(b, state, state.o + mu - z, sigma, sigma)
        state.v = F.layer_norm(z, z.shape[-1:], eps=eps)
        self._targets(b)

    def _own(self, b: FoldBlock, state: _Pass, u: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> None:
        """Block ``b``'s own part of its targets, ``t = u + w * v_q``, each row divided by its ``scale``."""
        sums = self.sums.get(b.index)
        if sums is None or state.g is None or len(state.g) != len(u):
            return
        scale = scale.clamp_min(torch.finfo(scale.dtype).tiny)
        state.g, u, w = state.g / scale, u / scale, w / scale
        sums.gram.addmm_(state.g.T, state.g)
        sums.own.addmm_(state.g.T, u)
        sums.own_energy += float((u * u).sum())
        sums.count += len(u)
        state.u, state.w = u, w

    def _targets(self, q: FoldBlock) -> None:
        """Block ``q``'s part of the target of every pair ``(p, q)`` whose ``p`` ran in this pass."""
        v = self._passes[q.index].v
        for (pi, qi), pair in self.pairs.items():
            p = self._passes.get(pi)
            if qi != q.index or p is None or p.u is None or len(p.u) != len(v):
                continue
            wv = p.w * v
            pair.cross.addmm_(p.g.T, wv)
            pair.energy += float((2 * p.u * wv + wv * wv).sum())
            pair.count += len(wv)
