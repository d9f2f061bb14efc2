"""Which merger folds what a structured granularity removes (``PruningConfig(merge=...)``): one entry per unit kind.

A merger has one contract: ``watch(next_step, schedule)`` after every optimizer step (and once before the first),
``choose(old_masks, new_masks)`` then ``fold(old_masks, new_masks)`` at every mask update before the masks apply,
``release()``, ``report()``. The pruning
group (:mod:`prune_callbacks.methods.steps.pruning`) builds one with `make_merger`; a new kind that can merge is a new
entry here (and ``"merge"`` in its granularity's ``config_fields``).
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from prune_callbacks.core.merge_config import MergeConfig
from prune_callbacks.methods.structured.block_merging import BlockMerger
from prune_callbacks.methods.structured.merging import UnitMerger

MERGERS: dict[str, Callable] = {
    "ffn_neurons": lambda model, granularity, config: UnitMerger(model, granularity.groups, config, granularity.family),
    "blocks": BlockMerger,
}


def make_merger(model: nn.Module, granularity, config: MergeConfig):
    """The merger for ``granularity``'s unit kind (config validation lets ``merge`` through only where one exists)."""
    kind = getattr(granularity, "kind", None)
    if kind not in MERGERS:
        raise ValueError(f"merge={config!r} is invalid for granularity={granularity.name!r}: merging is built for "
                         f"{', '.join(repr(k) for k in MERGERS)}; remove merge")
    return MERGERS[kind](model, granularity, config)
