"""Where the blocks, attention heads and FFN neurons of BERT, Llama and GPT-2 style models live.

A small self-contained map (module names by suffix); models it does not recognise still get
spectra, saliency mass and block figures, just no per-head / per-neuron figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn

# (input projections whose output rows belong to heads, output projection whose input columns do)
_ATTENTION = [
    (("attention.self.query", "attention.self.key", "attention.self.value"), "attention.output.dense"),  # BERT
    (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.o_proj"),  # Llama / Mistral
    (("attn.c_attn",), "attn.c_proj"),  # GPT-2 (fused qkv Conv1D)
]
_FFN = [
    (("intermediate.dense",), "output.dense"),  # BERT (output.dense, not attention.output.dense)
    (("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),
    (("mlp.c_fc",), "mlp.c_proj"),
]


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


def find_block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of repeated transformer blocks (the one holding the most parameters)."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[2]:
                best = (name, module, size)
    if best is None:
        return "", nn.ModuleList()
    return best[0], best[1]


def map_model(model: nn.Module) -> ModelMap:
    list_name, blocks = find_block_list(model)
    config = getattr(model, "config", None)
    heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0) or 0)
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 0)
    head_dim = int(getattr(config, "head_dim", 0) or (hidden // heads if heads else 0))
    kv = int(getattr(config, "num_key_value_heads", 0) or heads)
    out = []
    for i, block in enumerate(blocks):
        prefix = f"{list_name}.{i}" if list_name else str(i)
        names = {n for n, _ in block.named_modules() if n}
        entry = BlockMap(prefix, block)
        for ins, o in _ATTENTION:
            if o in names and all(n in names for n in ins):
                entry.attn_in, entry.attn_out = [f"{prefix}.{n}" for n in ins], f"{prefix}.{o}"
                break
        for ins, o in _FFN:
            if o in names and all(n in names for n in ins):
                entry.ffn_in, entry.ffn_out = [f"{prefix}.{n}" for n in ins], f"{prefix}.{o}"
                break
        out.append(entry)
    return ModelMap(out, heads, kv, head_dim)


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D stores its weight as (in, out)."""
    return type(module).__name__ == "Conv1D"
