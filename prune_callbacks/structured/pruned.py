"""`slim_pruned`: the one call that turns a model pruned with structured granularities into a smaller model.

The Trainer callback (``make_callbacks(..., slim=True)``), the Accelerate hook
(``finalize(slim=True)``) and the recipe (``output.slim: true``) call this after training,
before saving::

    from prune_callbacks.structured import slim_pruned
    summary = slim_pruned(model, pruner)   # finalizes the pruner, then cuts in place
    model.save_pretrained(out); tokenizer.save_pretrained(out)
"""

from __future__ import annotations

import torch
from torch import nn

from .slim import slim
from .units import StructuredUnitsError


def structured_keep(pruner) -> dict:
    """The ``keep`` (see :func:`.slim.slim`) described by ``pruner``'s structured groups (kinds ANDed)."""
    from ..granularity.structured import StructuredUnits

    keep: dict = {}
    for group in pruner.groups:
        granularity = group.granularity
        if not isinstance(granularity, StructuredUnits):
            continue
        mine = granularity.keep()
        if granularity.kind in keep:
            old = keep[granularity.kind]
            mine = [a & b for a, b in zip(old, mine)] if granularity.kind != "blocks" else \
                [a and b for a, b in zip(old, mine)]
        keep[granularity.kind] = mine
    return keep


def structured_family(pruner):
    """The user's own unit description the pruner's structured groups were built with (None: the family table)."""
    from ..granularity.structured import StructuredUnits

    families = {g.granularity.family for g in pruner.groups if isinstance(g.granularity, StructuredUnits)}
    if len(families) > 1:
        raise StructuredUnitsError("the structured pruning groups were given different unit descriptions (units=...); "
                                   "give every group the same one")
    return next(iter(families), None)


@torch.no_grad()
def slim_pruned(model: nn.Module, pruner) -> dict:
    """Finalize ``pruner`` (masks permanent, detached) and `slim` ``model`` by its structured masks.

    Refuses (`StructuredUnitsError`) a pruner with no structured group and a non-uniform width;
    returns `slim`'s summary. The pruner must not be used for training afterwards.
    """
    keep = structured_keep(pruner)
    if not keep:
        raise StructuredUnitsError(
            "slim needs a pruner with a structured granularity ('ffn_neurons', 'attention_heads' or 'blocks'); "
            f"this one has {', '.join(repr(g.config.granularity) for g in pruner.groups) or 'no pruning group'}"
        )
    family = structured_family(pruner)
    pruner.finalize(slim=True)
    return slim(model, keep, family=family)
