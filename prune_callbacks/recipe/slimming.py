"""``output.slim: true``: a recipe with structured pruning saves a smaller ordinary model.

Rules:

* **Needs a structured granularity.** At least one pruning config must prune structured units
  (``ffn_neurons``, ``attention_heads``, ``blocks``, or a registered subclass of
  `prune_callbacks.granularity.structured.StructuredUnits`); otherwise ``validate`` reports
  ``output.slim`` (`slim_problems`, called by ``schema.cross_check``). Unstructured configs may run
  beside a structured one: their zeros stay zeros in the slim model.
* **Blocks need slim.** ``granularity: blocks`` with ``output.slim: false`` is refused
  (`BLOCKS_NEED_SLIM`): a zeroed block is not an identity, so only the slim model is the measured one.
* **Uniform width.** ``validate --load`` / ``finetune`` build the Pruner before training; a width
  kind whose ``include`` / ``exclude`` leave blocks out of scope (they would keep every unit, so
  one config field cannot describe the widths) is refused there, not after training
  (`check_pruner`).
* **No sparse checkpoint.** A slim model is an ordinary dense model, so ``sparse/`` is not
  written: ``save_sparse`` left at its default is skipped (``report.json`` ``sizes.sparse_skipped``
  says why); ``save_sparse: true`` written in the recipe is an error.
* **Order** (`slim_model`): the report's sparsity figures are measured on the pruned, still
  masked model first (afterwards the pruner refers to the pre-slim tensors), then the units are
  cut out (`prune_callbacks.structured.slim_pruned`); the model saved, with its tokenizer, is the
  slim one, and ``AutoModel*.from_pretrained(output.dir)`` loads it with no custom code. The
  metrics are those of the masked model, which the slim model equals (up to float rounding).
"""

from __future__ import annotations

SPARSE_SKIPPED = ("output.slim: the saved model is an ordinary dense model (units cut out), so the sparse "
                  "format has nothing to compress; sparse/ was not written")


def structured_names() -> list[str]:
    """Registered granularities whose units are cut out by slim."""
    from ..granularity.structured import StructuredUnits
    from ..registry import GRANULARITIES

    return [n for n in GRANULARITIES.names() if _is_structured(n, StructuredUnits)]


def _is_structured(granularity: str, base) -> bool:
    from ..registry import GRANULARITIES

    try:
        cls, _ = GRANULARITIES.resolve(granularity)
    except KeyError:
        return False
    return isinstance(cls, type) and issubclass(cls, base)


def is_structured(config) -> bool:
    from ..granularity.structured import StructuredUnits

    return _is_structured(getattr(config, "granularity", ""), StructuredUnits)


#: why ``granularity: blocks`` needs ``output.slim: true`` (the one wording; the engine refuses the same case itself)
BLOCKS_NEED_SLIM = ("granularity 'blocks' needs output.slim: true: training skips a pruned block with a hook, but a "
                    "saved block whose weights are zero is not an identity (its LayerNorm, biases and residual path "
                    "still act), so the saved model would compute something other than the measured one; allowed: "
                    "output.slim: true (the pruned blocks are cut out of the saved model), or another granularity")


def uses_blocks(config) -> bool:
    from ..granularity.structured import Blocks

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
    if not any(is_structured(c) for c in configs):
        given = ", ".join(repr(c.granularity) for c in configs)
        where = "pruning.granularity" if len(configs) == 1 else "the granularity of one pruning entry"
        problems.append(("output.slim", f"output.slim: true needs structured pruning, but the pruning granularity is "
                                        f"{given}; allowed: set {where} to one of {', '.join(structured_names())}, "
                                        "or output.slim: false (unstructured zeros keep every shape)"))
    if out.save_sparse and "save_sparse" in out.model_fields_set:
        problems.append(("output.save_sparse", "output.save_sparse: true does not apply with output.slim: true (a slim "
                                               "model is an ordinary dense model: the sparse format has nothing to "
                                               "compress); allowed: leave save_sparse out, or false"))
    return problems


def check_pruner(pruner) -> None:
    """Refuse, before training, width units whose scope leaves blocks out (slim would refuse after training)."""
    from ..granularity.structured import Blocks, StructuredUnits
    from .errors import RecipeError

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
    """``(measure(), slim summary)``: the figures taken on the masked model, then the model slimmed in place."""
    from ..structured import StructuredUnitsError, slim_pruned
    from .errors import RecipeError

    from ..integrations.slim_log import log_slim

    before = measure()
    try:
        summary = slim_pruned(model, pruner)
    except StructuredUnitsError as exc:
        raise RecipeError([("output.slim", f"the pruned model cannot be slimmed: {exc}; nothing was saved "
                                           "(the Trainer checkpoints are kept)")],
                          source="output") from None
    log_slim(summary)
    return before, {**summary, "note": "report sparsity figures describe the pruned model before its units were "
                                       "cut out; the saved model is the slim one (params_after parameters)"}
