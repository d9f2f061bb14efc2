"""Structured pruning that physically shrinks the model (pure torch; never imports transformers).

* :mod:`.families`: the unit description of every architecture family (`FAMILIES`, one table);
* :mod:`.description`: the user's own (`UnitDescription`, ``PruningConfig(units=...)``);
* :mod:`.units`: which tensor slices one FFN neuron / KV group / block spans (`unit_map`);
* :mod:`.masking`: zeroing / skipping removed units while training (`mask_model`);
* :mod:`.slim`: cutting them out and rewriting the config (`slim`);
* :mod:`.pruned`: `slim_pruned(model, pruner)`, the one call the Trainer / Accelerate /
  recipe paths make after training with the ``ffn_neurons`` / ``attention_heads`` /
  ``blocks`` granularities (:mod:`prune_callbacks.granularity.structured`);
* :mod:`.support_matrix`: the architecture table the tests run and ``docs/support-matrix.md``
  is generated from (a test and docs tool, not imported here; it imports ``transformers``
  inside its functions).
"""

from .masking import mask_model, skip_block, zero_units
from .pruned import slim_pruned, structured_keep
from .slim import slim
from .description import UnitDescription
from .families import FAMILIES, Family
from .units import KINDS, Span, StructuredUnitsError, UnitGroup, block_layout, unit_map

__all__ = ["FAMILIES", "KINDS", "Family", "Span", "StructuredUnitsError", "UnitDescription", "UnitGroup",
           "block_layout", "mask_model", "skip_block", "slim", "slim_pruned", "structured_keep", "unit_map",
           "zero_units"]

