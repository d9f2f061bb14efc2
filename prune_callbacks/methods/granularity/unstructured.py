"""Unstructured granularity: any single weight may be pruned.

``scope="global"`` (default): one threshold over all targets, with optional
``min_layer_sparsity`` / ``max_layer_sparsity`` caps (water-filling keeps the
total exact); ``scope="per_layer"``: every target gets the same fraction.
"""

from __future__ import annotations

from prune_callbacks.core.registry import register_granularity
from prune_callbacks.methods.selection import global_masks, per_layer_masks
from prune_callbacks.methods.granularity.base import Granularity


@register_granularity("unstructured")
class Unstructured(Granularity):
    name = "unstructured"
    config_fields = frozenset({"scope", "min_layer_sparsity", "max_layer_sparsity"})

    @classmethod
    def check_config(cls, config, *args):
        set_ = config.model_fields_set
        caps = [f for f in ("min_layer_sparsity", "max_layer_sparsity") if f in set_]
        if config.scope == "per_layer" and caps:
            return [f"{f}={getattr(config, f)!r} does not apply with scope='per_layer' (every target gets the same "
                    "sparsity); remove it or use scope='global'" for f in caps]
        return []

    def select(self, scores, sparsity):
        where = {"reducer": self.layout.reducer, "global_numels": list(self.layout.numels)}  # local shards: global positions
        if self.config.scope == "per_layer":
            return per_layer_masks(scores, self.masks, sparsity, **where)
        return global_masks(scores, self.masks, sparsity, self.config.min_layer_sparsity,
                            self.config.max_layer_sparsity, **where)
