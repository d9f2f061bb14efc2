"""Low-rank export: factorised Linears, their checkpoint, and back to a plain model.

After training with ``granularity="low_rank"`` (:mod:`prune_callbacks.methods.granularity.low_rank`)::

    from prune_callbacks.export.dispatch import export_pruned
    from prune_callbacks.export.low_rank import save_low_rank, load_low_rank, densify

    summary = export_pruned(model, pruner)      # finalize + two thin Linears per target
    save_low_rank(model, "out", tokenizer)      # model.low_rank.safetensors + config.json
    model = load_low_rank("out")                # the factorised model, bitwise
    densify("out", "out-dense")                 # a plain save_pretrained folder

* :mod:`.factorize`: `LowRankLinear` and the exporter (pure torch);
* :mod:`.checkpoint`: save / load / densify (``transformers``; imported on first use).
"""

from prune_callbacks._lazy import lazy_exports
from prune_callbacks.export.low_rank.factorize import LowRankLinear, densify_model, factorize_granularities, low_rank_modules

__all__ = ["LowRankLinear", "factorize_granularities", "densify_model", "low_rank_modules", "save_low_rank",
           "load_low_rank", "densify", "LowRankCheckpointError", "WEIGHTS_NAME"]
_LAZY = {name: "prune_callbacks.export.low_rank.checkpoint" for name in ("save_low_rank", "load_low_rank", "densify", "LowRankCheckpointError",
                                          "WEIGHTS_NAME")}
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
