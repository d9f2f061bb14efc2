"""`export_model`: the one export call of the adapters, and the guard on saving a factorised model.

The Trainer callbacks (``make_callbacks(..., slim=True)``), the Accelerate hook
(``finalize(slim=True)``) and the recipe (``output.slim: true``) all mean "export the compact form"
and all call `export_model`, which runs :func:`prune_callbacks.export.dispatch.export_pruned`: each group's
granularity names its export (``export_as``), so structured units are cut out (``"slim"``: a smaller
ordinary model) and ``low_rank`` Linears become two thin Linears (``"low_rank"``). No adapter looks
at granularity names. The summaries come back keyed by export name (``{"slim": ..., "low_rank": ...}``)
and each is logged in one line (:mod:`.slim_log`).

A factorised model (`~prune_callbacks.export.low_rank.LowRankLinear` modules) is not something plain
``from_pretrained`` can rebuild (the config has one width per projection), so after a low-rank export
`export_model` makes the model's ``save_pretrained`` raise `FACTORISED_PLAIN_SAVE` (which names
``save_low_rank``); `factorised_save_problem` gives the same wording to the adapters' sparse save.
No transformers import here.
"""

from __future__ import annotations

import logging
from typing import Mapping, Optional

from prune_callbacks.export.dispatch import EXPORTS, export_pruned
from prune_callbacks.export.low_rank.factorize import low_rank_modules
from prune_callbacks.methods.structured.units import StructuredUnitsError
from prune_callbacks.integrations.slim_log import _count, describe_slim

logger = logging.getLogger("prune_callbacks.slim")

#: why a factorised model is not saved with save_pretrained / save_sparse (the one wording)
FACTORISED_PLAIN_SAVE = (
    "this model holds factorised low-rank Linears (LowRankLinear: granularity 'low_rank' exported with slim=True / "
    "output.slim: true), which plain from_pretrained cannot rebuild; save it with "
    "prune_callbacks.export.low_rank.save_low_rank(model, directory, tokenizer) and load it with load_low_rank(directory) "
    "(prune_callbacks.export.low_rank.densify(directory, out) then writes an ordinary from_pretrained checkpoint), or "
    "train without slim=True to keep the dense-shaped rank-r weights, which save and load as an ordinary model")


def exports_named(pruner) -> list[str]:
    """The export names (``export_as``) of ``pruner``'s groups, in order, each once."""
    names = [g.granularity.export_as for g in pruner.groups]
    return list(dict.fromkeys(n for n in names if n is not None))


def export_model(model, pruner, *, log: bool = True) -> dict[str, dict]:
    """Finalize ``pruner`` and export ``model`` in place; ``{export name: its summary}`` (logged unless ``log=False``).

    Refuses (`StructuredUnitsError`, a ``ValueError``, before anything is changed) a pruner none of whose
    granularities has a compact form (unstructured, N:M: their zeros stay in place, nothing to export).
    """
    if not exports_named(pruner):
        raise StructuredUnitsError(
            "slim / output.slim exports the compact form, but no pruning group has one: "
            f"{', '.join(repr(g.config.granularity) for g in pruner.groups) or 'no pruning group'} "
            f"(granularities with one: the structured units ({_names('slim')}) are cut out, {_names('low_rank')} "
            "Linears are factorised); allowed: one of those granularities, or no slim (zeros stay in place)")
    by_function = export_pruned(model, pruner)
    summaries = {name: by_function[fn.__name__] for name, fn in EXPORTS.items() if fn.__name__ in by_function}
    for name, summary in summaries.items() if log else ():
        logger.warning("prune_callbacks: %s", describe_export(name, summary))
    if low_rank_modules(model):
        refuse_plain_save(model)
    return summaries


def _names(export: str) -> str:
    from prune_callbacks.core.registry import GRANULARITIES

    names = []
    for name in GRANULARITIES.names():
        try:
            cls, _ = GRANULARITIES.resolve(name)
        except KeyError:
            continue
        if getattr(cls, "export_as", None) == export:
            names.append(repr(name))
    return ", ".join(names) or "none registered"


def describe_export(name: str, summary: Mapping) -> str:
    """One line for one export's summary (``slim``: :func:`.slim_log.describe_slim`)."""
    if "config" in summary:
        return describe_slim(summary)
    before, after = int(summary["params_before"]), int(summary["params_after"])
    change = (after - before) / before if before else 0.0
    line = (f"exported the model ({name}): {_count(before)} -> {_count(after)} parameters ({before:,} -> {after:,}, "
            f"{change:+.1%})")
    if "bytes_before" in summary:
        line += f", {int(summary['bytes_before']):,} -> {int(summary['bytes_after']):,} bytes"
    if "ranks" in summary:
        line += f"; {len(summary['ranks'])} Linears factorised (save with prune_callbacks.export.low_rank.save_low_rank)"
    return line


def factorised_save_problem(model) -> Optional[str]:
    """`FACTORISED_PLAIN_SAVE` when ``model`` holds `LowRankLinear` modules, else None."""
    return FACTORISED_PLAIN_SAVE if low_rank_modules(model) else None


def refuse_plain_save(model) -> None:
    """Make ``model.save_pretrained`` raise `FACTORISED_PLAIN_SAVE` (``save_low_rank`` does not call it)."""
    if not hasattr(model, "save_pretrained"):
        return

    def save_pretrained(*args, **kwargs):
        raise RuntimeError(FACTORISED_PLAIN_SAVE)

    model.save_pretrained = save_pretrained
