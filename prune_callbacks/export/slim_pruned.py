"""`slim_pruned`: turn a model pruned with structured granularities into a smaller model.

`slim_granularities` is the ``"slim"`` export that the adapters reach through
`prune_callbacks.export.dispatch.export_pruned` (``make_callbacks(..., slim=True)``, ``finalize(slim=True)``,
``output.slim: true``); in Python, for a pruner whose groups are all structured::

    from prune_callbacks.export import slim_pruned
    summary = slim_pruned(model, pruner)   # finalizes the pruner, then cuts in place
    model.save_pretrained(out); tokenizer.save_pretrained(out)
"""

from __future__ import annotations

import torch
from torch import nn

from prune_callbacks.export.slim import slim
from prune_callbacks.methods.structured.units import StructuredUnitsError


def _slimmed(pruner) -> list:
    """``pruner``'s granularities whose export is slimming (``export_as == "slim"``)."""
    return [g.granularity for g in pruner.groups if g.granularity.export_as == "slim"]


def structured_keep(pruner) -> dict:
    """The ``keep`` (see :func:`.slim.slim`) described by ``pruner``'s structured groups (kinds ANDed)."""
    return _keep_of(_slimmed(pruner))


def _keep_of(granularities) -> dict:
    keep: dict = {}
    for granularity in granularities:
        mine = granularity.keep()
        if granularity.kind in keep:
            old = keep[granularity.kind]
            mine = [a & b for a, b in zip(old, mine)] if granularity.kind != "blocks" else \
                [a and b for a, b in zip(old, mine)]
        keep[granularity.kind] = mine
    return keep


def structured_family(pruner):
    """The user's own unit description the pruner's structured groups were built with (None: the family table)."""
    return _family_of(_slimmed(pruner))


def _family_of(granularities):
    families = {g.family for g in granularities}
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


@torch.no_grad()
def slim_granularities(model: nn.Module, granularities) -> dict:
    """The ``"slim"`` export (`prune_callbacks.export.dispatch.EXPORTS`): `slim` ``model`` by these finalized groups' keep."""
    return slim(model, _keep_of(granularities), family=_family_of(granularities))
