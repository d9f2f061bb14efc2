"""Masking structured units without cutting them: what the model computes while it trains.

* width units (FFN neurons, KV groups): every spanned slice is written to +0.0
  (`zero_units`), so a removed neuron's activation is zero and its output column is
  zero: it contributes exactly nothing;
* blocks: the block's parameters are zeroed *and* the block is skipped by a forward
  hook that returns its input hidden states (`skip_block`). Zeroing alone is not
  enough for post-LayerNorm blocks (BERT: ``LayerNorm(0 + x) != x``); skipping is
  exactly what removing the block does.

`mask_model` applies a ``keep`` (as taken by :func:`.slim.slim`) this way; tests use
it to compare a masked model with its slimmed copy.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from prune_callbacks.core.families import Family
from prune_callbacks.methods.structured.units import WIDTH_KINDS, UnitGroup, block_layout, unit_map

_HOOK_ATTR = "_prune_callbacks_skip_hook"


@torch.no_grad()
def zero_units(group: UnitGroup, pruned: torch.Tensor, where=None) -> None:
    """Write +0.0 into every slice of ``group``'s spans that belongs to a pruned unit (bool ``[n_units]``).

    ``where(span) -> (tensor, first_row)``: the tensor to write and the global index of its first row
    (FSDP2: this rank's rows of the parameter, see :mod:`prune_callbacks.methods.sharding`); default: the whole
    parameter, row 0.
    """
    if not bool(pruned.any()):
        return
    units = pruned.nonzero().reshape(-1)
    for span in group.spans:
        tensor, first = where(span) if where is not None else (span.param.data, 0)
        if span.dim is None:
            tensor.zero_()
            continue
        index = span.unit_index(units).to(tensor.device)
        if span.dim == 0 and tuple(tensor.shape) != tuple(span.param.shape):  # rows [first, first + local rows)
            index = index[(index >= first) & (index < first + tensor.shape[0])] - first
        tensor.index_fill_(span.dim, index, 0.0)


def _skip(module, args, kwargs, output):
    hidden = args[0] if args else kwargs.get("hidden_states")
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden


def skip_block(block: nn.Module, skip: bool = True) -> None:
    """Make ``block`` return its input hidden states (``skip=False`` removes that again)."""
    handle = getattr(block, _HOOK_ATTR, None)
    if skip and handle is None:
        setattr(block, _HOOK_ATTR, block.register_forward_hook(_skip, with_kwargs=True))
    elif not skip and handle is not None:
        handle.remove()
        delattr(block, _HOOK_ATTR)


def is_skipped(block: nn.Module) -> bool:
    return getattr(block, _HOOK_ATTR, None) is not None


@torch.no_grad()
def mask_model(model: nn.Module, keep: Mapping[str, Optional[Sequence]], family: Optional[Family] = None) -> None:
    """Mask (zero / skip) what ``keep`` removes, without changing any shape."""
    layout = block_layout(model, family=family)
    for kind in WIDTH_KINDS:
        if keep.get(kind) is not None:
            for group, kept in zip(unit_map(model, kind, layout=layout), keep[kind]):
                zero_units(group, ~torch.as_tensor(kept, dtype=torch.bool))
    if keep.get("blocks") is not None:
        for group, kept in zip(unit_map(model, "blocks", layout=layout), keep["blocks"]):
            if not bool(kept):
                zero_units(group, torch.ones(1, dtype=torch.bool))
                skip_block(layout.modules[group.block])
