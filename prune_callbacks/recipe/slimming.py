"""``output.slim: true``: a recipe saves the compact form its granularities name (``export_as``).

``output.slim`` means "export the compact form" (:mod:`prune_callbacks.integrations.exporting`, the
same call as the Trainer's ``slim=True`` and Accelerate's ``finalize(slim=True)``): structured units
are cut out (a smaller ordinary model), ``low_rank`` Linears are factorised into two thin Linears.

Rules:

* **Needs a granularity with a compact form.** At least one pruning config must prune structured
  units (``ffn_neurons``, ``attention_heads``, ``blocks``, or a registered subclass of
  `prune_callbacks.methods.granularity.structured.StructuredUnits`) or be ``low_rank`` (any registered
  granularity whose ``export_as`` names an export); otherwise ``validate`` reports ``output.slim``
  (`slim_problems`, called by ``schema.cross_check``). Unstructured configs may run beside one:
  their zeros stay zeros in the exported model.
* **Blocks need slim.** ``granularity: blocks`` with ``output.slim: false`` is refused
  (`BLOCKS_NEED_SLIM`): a zeroed block is not an identity, so only the slim model is the measured one.
  (``low_rank`` with ``output.slim: false`` is fine: the saved weights are the dense-shaped rank-r ones,
  which plain ``from_pretrained`` loads and which compute what was measured.)
* **Uniform width.** ``validate --load`` / ``finetune`` build the Pruner before training; a width
  kind whose ``include`` / ``exclude`` leave blocks out of scope (they would keep every unit, so
  one config field cannot describe the widths) is refused there, not after training
  (`check_pruner`).
* **No sparse checkpoint.** The exported model is not a masked dense one, so ``sparse/`` is not
  written: ``save_sparse`` left at its default is skipped (``report.json`` ``sizes.sparse_skipped``
  says why); ``save_sparse: true`` written in the recipe is an error.
* **Order** (`slim_model`): the report's sparsity figures are measured on the pruned, still
  masked model first (afterwards the pruner refers to the pre-export tensors), then the model is
  exported in place; ``report.json`` holds each export's summary under its name (``slim``,
  ``low_rank``: parameters, and for low_rank bytes, before and after). The model saved, with its
  tokenizer, is the exported one: a slim model with ``save_pretrained`` (``AutoModel*.from_pretrained``
  loads it with no custom code), a factorised one with `prune_callbacks.export.low_rank.save_low_rank`
  (`save_model`; ``load_low_rank(output.dir)`` loads it, ``densify`` writes an ordinary checkpoint).
  The metrics are those of the masked model, which the exported model equals (up to float rounding).
"""

from __future__ import annotations

SPARSE_SKIPPED = ("output.slim: the saved model is its compact form (structured units cut out / low-rank Linears "
                  "factorised), not a masked dense one, so the sparse format has nothing to compress; sparse/ was "
                  "not written")


def structured_names() -> list[str]:
    """Registered granularities whose units are cut out by slim."""
    from prune_callbacks.methods.granularity.structured import StructuredUnits
    from prune_callbacks.core.registry import GRANULARITIES

    return [n for n in GRANULARITIES.names() if _is_structured(n, StructuredUnits)]


def _is_structured(granularity: str, base) -> bool:
    from prune_callbacks.core.registry import GRANULARITIES

    try:
        cls, _ = GRANULARITIES.resolve(granularity)
    except KeyError:
        return False
    return isinstance(cls, type) and issubclass(cls, base)


def is_structured(config) -> bool:
    from prune_callbacks.methods.granularity.structured import StructuredUnits

    return _is_structured(getattr(config, "granularity", ""), StructuredUnits)


#: why ``granularity: blocks`` needs ``output.slim: true`` (the one wording; the engine refuses the same case itself)
BLOCKS_NEED_SLIM = ("granularity 'blocks' needs output.slim: true: training skips a pruned block with a hook, but a "
                    "saved block whose weights are zero is not an identity (its LayerNorm, biases and residual path "
                    "still act), so the saved model would compute something other than the measured one; allowed: "
                    "output.slim: true (the pruned blocks are cut out of the saved model), or another granularity")


def _export_of(granularity: str):
    """The export a registered granularity names (``export_as``), or None."""
    from prune_callbacks.core.registry import GRANULARITIES

    try:
        cls, _ = GRANULARITIES.resolve(granularity)
    except KeyError:
        return None
    return getattr(cls, "export_as", None)


def has_export(config) -> bool:
    """Whether ``config``'s granularity has a compact form (``export_as``: slim, low_rank, ...)."""
    return _export_of(getattr(config, "granularity", "")) is not None


def exporting_names() -> list[str]:
    """Registered granularities with a compact form that are not structured units (low_rank, ...)."""
    from prune_callbacks.core.registry import GRANULARITIES

    structured = set(structured_names())
    return [n for n in GRANULARITIES.names() if n not in structured and _export_of(n) is not None]


def uses_blocks(config) -> bool:
    from prune_callbacks.methods.granularity.structured import Blocks

    return _is_structured(getattr(config, "granularity", ""), Blocks)


def slim_problems(recipe) -> list[tuple[str, str]]:
    """``(yaml path, message)`` for ``output.slim`` / ``output.save_sparse``, and for ``blocks`` without slim."""
    out = recipe.output
    if not out.slim:
        configs = recipe.pruning_configs
        return [(("pruning" if len(configs) == 1 else f"pruning.{i}") + ".granularity", BLOCKS_NEED_SLIM)
                for i, config in enumerate(configs) if uses_blocks(config)]
    problems = []
    configs = recipe.pruning_configs
    if not any(has_export(c) for c in configs):
        given = ", ".join(repr(c.granularity) for c in configs)
        where = "pruning.granularity" if len(configs) == 1 else "the granularity of one pruning entry"
        others = exporting_names()
        problems.append(("output.slim", f"output.slim: true needs structured pruning"
                                        f"{' or ' + ', '.join(others) if others else ''} (a granularity with a compact "
                                        f"form), but the pruning granularity is {given}; allowed: set {where} to one "
                                        f"of {', '.join(structured_names())} (units cut out)"
                                        f"{' or ' + ', '.join(others) + ' (Linears factorised)' if others else ''}, "
                                        "or output.slim: false (unstructured zeros keep every shape)"))
    if out.save_sparse and "save_sparse" in out.model_fields_set:
        problems.append(("output.save_sparse", "output.save_sparse: true does not apply with output.slim: true (the "
                                               "saved model is its compact form, not a masked dense one: the sparse "
                                               "format has nothing to compress); allowed: leave save_sparse out, or "
                                               "false"))
    return problems


def check_pruner(pruner) -> None:
    """Refuse, before training, width units whose scope leaves blocks out (slim would refuse after training)."""
    from prune_callbacks.methods.granularity.structured import Blocks, StructuredUnits
    from prune_callbacks.recipe.errors import RecipeError

    for i, group in enumerate(pruner.groups):
        g = group.granularity
        if isinstance(g, StructuredUnits) and not isinstance(g, Blocks) and len(g.groups) < g.n_blocks:
            left = sorted(set(range(g.n_blocks)) - {u.layer for u in g.groups})
            raise RecipeError([("output.slim", f"output.slim: true, but pruning config {i} ({g.kind}) leaves blocks "
                                               f"{left} out of its scope (include / exclude): they would keep every "
                                               "unit, and one config field cannot describe different widths; "
                                               "allowed: a scope covering every block, or output.slim: false")],
                              source="output")


def slim_model(model, pruner, measure) -> tuple[object, dict]:
    """``(measure(), {export name: summary})``: the figures taken on the masked model, then the model exported
    in place (`prune_callbacks.integrations.exporting.export_model`: the call the Trainer and Accelerate make)."""
    from prune_callbacks.integrations.exporting import export_model
    from prune_callbacks.methods.structured import StructuredUnitsError
    from prune_callbacks.recipe.errors import RecipeError

    before = measure()
    try:
        summaries = export_model(model, pruner)
    except StructuredUnitsError as exc:
        raise RecipeError([("output.slim", f"the pruned model cannot be exported (slimmed): {exc}; nothing was saved "
                                           "(the Trainer checkpoints are kept)")],
                          source="output") from None
    notes = {"slim": "report sparsity figures describe the pruned model before its units were cut out; the saved "
                     "model is the slim one (params_after parameters)",
             "low_rank": "report sparsity figures describe the pruned model before its Linears were factorised; the "
                         "saved model is the factorised one (params_after parameters, bytes_after bytes), written "
                         "with prune_callbacks.export.low_rank.save_low_rank: load it with load_low_rank"}
    return before, {name: {**summary, **({"note": notes[name]} if name in notes else {})}
                    for name, summary in summaries.items()}


def save_model(model, directory, tokenizer=None) -> None:
    """Save the (exported) model: with ``save_low_rank`` when it holds factorised Linears (plain
    ``from_pretrained`` cannot rebuild those), else ``save_pretrained``; the tokenizer beside it."""
    from prune_callbacks.export.low_rank import save_low_rank
    from prune_callbacks.export.low_rank.factorize import low_rank_modules

    if low_rank_modules(model):
        save_low_rank(model, directory, tokenizer=tokenizer)
        return
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
