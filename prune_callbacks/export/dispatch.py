"""`export_pruned`: finalize a pruner and turn each granularity's result into its exported form.

The dispatch is on the granularity's ``export_as`` name, never on its type: groups that name the same
export are exported together (several structured kinds are cut in one
`~prune_callbacks.export.slim.slim`, AND-ing their keeps); a granularity without one (unstructured,
N:M) leaves its masks as exact zeros in place. `EXPORTS` is the name -> function table; the built-in ones:

* ``"slim"`` (structured units): :func:`prune_callbacks.export.slim_pruned.slim_granularities` (a smaller dense model);
* ``"low_rank"``: :func:`prune_callbacks.export.low_rank.factorize.factorize_granularities` (two thin Linears).

A new export registers itself with `register_export`; the granularity only names it, so the methods never
import the export layer.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from prune_callbacks.export.low_rank.factorize import factorize_granularities
from prune_callbacks.export.slim_pruned import slim_granularities

#: export name (``Granularity.export_as``) -> ``fn(model, [finalized granularities]) -> summary``
EXPORTS: dict[str, Callable] = {"slim": slim_granularities, "low_rank": factorize_granularities}


def register_export(name: str, fn: Callable, *, replace: bool = False) -> Callable:
    """Add an export a granularity can name in ``export_as``."""
    if name in EXPORTS and EXPORTS[name] is not fn and not replace:
        raise ValueError(f"export {name!r} is already registered ({EXPORTS[name]!r}); pass replace=True")
    EXPORTS[name] = fn
    return fn


@torch.no_grad()
def export_pruned(model: nn.Module, pruner) -> dict:
    """Finalize ``pruner`` and run every export its groups name; ``{export function name: its summary}``.

    The pruner must not be used for training afterwards (modules may have been replaced).
    """
    pruner.finalize()
    by_export: dict[str, list] = {}
    for group in pruner.groups:
        name = group.granularity.export_as
        if name is None:
            continue
        if name not in EXPORTS:
            raise ValueError(f"granularity {group.config.granularity!r} names export {name!r}, which is not "
                             f"registered (known: {', '.join(sorted(EXPORTS))}); see register_export")
        by_export.setdefault(name, []).append(group.granularity)
    return {EXPORTS[name].__name__: EXPORTS[name](model, granularities) for name, granularities in by_export.items()}
