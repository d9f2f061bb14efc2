"""The blocks, attention heads and FFN neurons of a model, as analysis reads them.

Not a parser of its own: every fact comes from :mod:`prune_callbacks.methods.structured.units`, which
reads the family table (:mod:`prune_callbacks.core.families`): which ``nn.ModuleList`` s
hold the blocks, where q/k/v/o and the FFN projections are, and which slices of which tensors
one head (KV group) and one neuron span (`unit_map`, the description structured pruning and
`slim` use). Models whose blocks it does not recognise still get spectra, saliency mass and
block figures, just no per-head / per-neuron figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from prune_callbacks.methods.structured.units import StructuredUnitsError, UnitGroup, block_layout, head_geometry, unit_map


@dataclass
class BlockMap:
    name: str  # e.g. "encoder.layer.3"
    module: nn.Module
    attn_in: list[str] = field(default_factory=list)
    attn_out: Optional[str] = None
    ffn_in: list[str] = field(default_factory=list)
    ffn_out: Optional[str] = None


@dataclass
class ModelMap:
    blocks: list[BlockMap]
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    heads: list[UnitGroup] = field(default_factory=list)  # one per attention (KV groups; unit_map, describe_only)
    ffn: list[UnitGroup] = field(default_factory=list)  # one per block

    def attention_name(self, group: UnitGroup) -> str:
        """The name analysis gives one attention (`UnitGroup.label`)."""
        return group.label


def map_model(model: nn.Module) -> ModelMap:
    layout = block_layout(model, known_only=False)
    out = []
    for name in layout.blocks:
        attn_in, attn_out = layout.attention_modules(name)
        ffn_in, ffn_out = layout.ffn_modules(name)
        out.append(BlockMap(name, layout.modules[name], attn_in, attn_out, ffn_in, ffn_out))
    if layout.family is None:
        return ModelMap(out)
    heads, kv, head_dim = head_geometry(layout.config, layout.family)
    try:
        head_groups = unit_map(model, "attention_heads", layout=layout, describe_only=True)
    except StructuredUnitsError:  # no head geometry in the config: no per-head figures
        head_groups = []
    return ModelMap(out, heads, kv, head_dim, head_groups, unit_map(model, "ffn_neurons", layout=layout))
