"""Structured units while training (pure torch; never imports transformers).

* :mod:`.layout`: where a model's blocks and their projections are (`block_layout`);
* :mod:`.units`: which tensor slices one FFN neuron / KV group / block spans (`unit_map`), read from the
  family table (:mod:`prune_callbacks.core.families`) or the user's own description
  (:mod:`prune_callbacks.core.unit_description`);
* :mod:`.masking`: zeroing / skipping removed units while training (`mask_model`);
* :mod:`.mergers`: folding what removed units did into what stays (``PruningConfig(merge=...)``): FFN neurons in
  :mod:`.merging`, blocks in :mod:`.block_merging` (their statistics: :mod:`.block_statistics`); the calibration
  window both gather through is :mod:`.calibration`, the solve :mod:`.ridge`.

Cutting them out afterwards is an export: :mod:`prune_callbacks.export.slim` (`slim`) and
:mod:`prune_callbacks.export.slim_pruned` (`slim_pruned(model, pruner)`).
"""

from prune_callbacks.core.families import FAMILIES, Family, StructuredUnitsError
from prune_callbacks.core.unit_description import UnitDescription
from prune_callbacks.methods.structured.masking import mask_model, skip_block, zero_units
from prune_callbacks.methods.structured.units import KINDS, Span, UnitGroup, block_layout, unit_map

__all__ = ["FAMILIES", "KINDS", "Family", "Span", "StructuredUnitsError", "UnitDescription", "UnitGroup",
           "block_layout", "mask_model", "skip_block", "unit_map", "zero_units"]
