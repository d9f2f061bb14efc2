"""Blocks: how much each transformer block changes its input (1 - cosine of input and output hidden
states, averaged over real tokens), and the metric with the block skipped (its output replaced by
its input, as structured block pruning does)."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from prune_callbacks.methods.structured.masking import is_skipped, skip_block


def _hidden_in(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class BlockInfluence:
    """Hooks on every block; ``select(mask)`` before a forward pass, ``accumulate()`` after it."""

    def __init__(self, blocks: list[tuple[str, nn.Module]]):
        self.blocks = blocks
        self.sum = [0.0] * len(blocks)
        self.tokens = 0
        self._in: dict[int, torch.Tensor] = {}
        self._out: dict[int, torch.Tensor] = {}
        self._handles = []
        self.mask: Optional[torch.Tensor] = None

    def __enter__(self):
        for i, (_, module) in enumerate(self.blocks):
            self._handles.append(module.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post(i)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pre(self, i):
        def hook(module, args, kwargs):
            self._in[i] = _hidden_in(args, kwargs).detach()
        return hook

    def _post(self, i):
        def hook(module, args, output):
            self._out[i] = _hidden_out(output).detach()
        return hook

    def select(self, mask: Optional[torch.Tensor]) -> None:
        self.mask = mask

    def accumulate(self) -> None:
        if not self._in:
            return
        n = None
        for i in range(len(self.blocks)):
            x, y = self._in[i], self._out[i]
            if x.shape != y.shape:  # not a residual block: input and output are not comparable
                self.sum[i] = float("nan")
                continue
            cos = nn.functional.cosine_similarity(x.double(), y.double(), dim=-1).reshape(-1)
            if self.mask is not None:
                cos = cos[self.mask.reshape(-1).to(cos.device).bool()]
            self.sum[i] += float((1.0 - cos).sum())
            n = cos.numel()
        self.tokens += n or 0
        self._in.clear()
        self._out.clear()

    def influence(self) -> list[float]:
        return [s / self.tokens if self.tokens else 0.0 for s in self.sum]


@contextlib.contextmanager
def skipped(block: nn.Module):
    """Within the context, ``block`` returns its input unchanged: the same hook structured pruning uses
    to remove a block (:func:`prune_callbacks.methods.structured.masking.skip_block`)."""
    if is_skipped(block):  # already skipped by its owner: leave that hook alone
        yield
        return
    skip_block(block)
    try:
        yield
    finally:
        skip_block(block, skip=False)
