"""The blocks, attention heads and FFN neurons of a model, as analysis reads them.

Not a parser of its own: every fact comes from :func:`prune_callbacks.structured.units.block_layout`
(which ``nn.ModuleList`` holds the blocks, which architecture they are, where q/k/v/o and the FFN
projections are) and :func:`~prune_callbacks.structured.units.head_geometry`. Models whose blocks
it does not recognise still get spectra, saliency mass and block figures, just no per-head /
per-neuron figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from ..structured.units import block_layout, head_geometry, is_transposed

is_conv1d = is_transposed  # GPT-2's Conv1D stores its weight as (in, out)


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


def map_model(model: nn.Module) -> ModelMap:
    layout = block_layout(model, known_only=False)
    heads, kv, head_dim = head_geometry(getattr(model, "config", None))
    out = []
    for name in layout.blocks:
        attn_in, attn_out = layout.attention_modules(name)
        ffn_in, ffn_out = layout.ffn_modules(name)
        out.append(BlockMap(name, layout.modules[name], attn_in, attn_out, ffn_in, ffn_out))
    return ModelMap(out, heads, kv, head_dim)
