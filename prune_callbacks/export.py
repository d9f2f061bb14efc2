"""`export_pruned`: finalize a pruner and turn each granularity's result into its exported form.

The dispatch is on the granularity (`Granularity.exporter`), never on its type: groups whose
exporter is the same function are exported together (several structured kinds are cut in one
`~prune_callbacks.structured.slim.slim`, AND-ing their keeps); a granularity without an exporter
(unstructured, N:M) leaves its masks as exact zeros in place. Built-in exporters:

* structured units: :func:`prune_callbacks.structured.pruned.slim_granularities` (a smaller dense model);
* low rank: :func:`prune_callbacks.low_rank.factorize.factorize_granularities` (two thin Linears).
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def export_pruned(model: nn.Module, pruner) -> dict:
    """Finalize ``pruner`` and run every exporter its groups name; ``{exporter name: its summary}``.

    The pruner must not be used for training afterwards (modules may have been replaced).
    """
    pruner.finalize()
    order: list = []
    by_exporter: dict = {}
    for group in pruner.groups:
        fn = group.granularity.exporter()
        if fn is None:
            continue
        if fn not in by_exporter:
            order.append(fn)
            by_exporter[fn] = []
        by_exporter[fn].append(group.granularity)
    return {fn.__name__: fn(model, by_exporter[fn]) for fn in order}
