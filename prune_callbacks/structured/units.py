"""Unit maps: which slices of which tensors one structured unit spans.

A *unit* is what structured pruning removes as a whole:

* ``ffn_neurons``: one intermediate neuron of a block's feed-forward network: its row
  (Linear) / column (GPT-2 ``Conv1D``, weight stored ``[in, out]``) in every input
  projection (BERT ``intermediate.dense``; Llama ``gate_proj`` + ``up_proj``; GPT-2
  ``mlp.c_fc``) with its bias entry, and its column (Linear) / row (Conv1D) in the
  output projection (``output.dense``, ``down_proj``, ``mlp.c_proj``);
* ``attention_heads``: one KV group of a Llama-family attention (grouped-query
  attention: the group's K and V heads together with the ``num_attention_heads //
  num_key_value_heads`` query heads that read them; without GQA that is one head):
  its rows of ``q_proj``/``k_proj``/``v_proj`` (biases included) and its columns of
  ``o_proj``. Only where the config has its own ``head_dim`` (so fewer heads keep the
  hidden size); BERT and GPT-2 derive head size as hidden / heads, so a config cannot
  describe fewer heads and this is refused (use ``ffn_neurons`` or ``blocks``);
* ``blocks``: one whole transformer block (every parameter in it).

`unit_map(model, kind)` returns one `UnitGroup` per block: how many units it has and
the `Span` s (tensor slices) they cover. Unit ``i`` of a group covers, in every span,
the indices ``[i * size, (i + 1) * size)`` along ``dim`` (``dim=None``: the whole
tensor). Masks (:mod:`prune_callbacks.granularity.structured`) and the physical cut
(:mod:`.slim`) both read this one description.

Pure torch: the architecture is recognised by module names and read from the model's
``config`` duck-typed (``transformers`` is never imported).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..targets import unwrap_model

KINDS = ("ffn_neurons", "attention_heads", "blocks")


class StructuredUnitsError(ValueError):
    """A model or unit kind that structured pruning cannot describe or cut."""


@dataclass(frozen=True)
class Span:
    """Slices of one parameter spanned by a group's units (``size`` entries per unit along ``dim``)."""

    module: str  # full module name
    param_name: str  # "weight" / "bias"
    param: torch.Tensor = field(compare=False, repr=False)
    dim: Optional[int]  # None: the whole tensor belongs to the (single) unit
    size: int

    @property
    def name(self) -> str:
        return f"{self.module}.{self.param_name}"

    def unit_index(self, units: torch.Tensor) -> torch.Tensor:
        """Indices along ``dim`` covered by the given unit numbers."""
        units = units.to(torch.long).reshape(-1, 1)
        return (units * self.size + torch.arange(self.size, device=units.device)).reshape(-1)

    def unit_view(self, tensor: torch.Tensor, n_units: int) -> torch.Tensor:
        """``tensor`` (shaped like the parameter) as ``[n_units, -1]`` along this span's dimension."""
        if self.dim is None:
            return tensor.reshape(1, -1)
        moved = tensor.movedim(self.dim, 0)
        return moved.reshape(n_units, -1)


@dataclass
class UnitGroup:
    """The units of one kind in one block."""

    kind: str
    layer: int  # block index in its container
    block: str  # the block's module name
    n_units: int
    spans: list[Span]

    @property
    def mask_name(self) -> str:
        return f"{self.block}:{self.kind}"


@dataclass(frozen=True)
class ArchSpec:
    """Where one architecture keeps its units, relative to a block."""

    name: str
    ffn_in: tuple[str, ...]  # input projections (all optional except the first present one)
    ffn_out: tuple[str, ...]
    ffn_config_field: str
    q: Optional[str] = None
    k: Optional[str] = None
    v: Optional[str] = None
    o: Optional[str] = None
    qkv: Optional[str] = None  # one fused q|k|v projection (GPT-2 ``c_attn``) instead of q, k, v
    heads_refusal: Optional[str] = None  # why attention_heads cannot be cut here

    @property
    def attention_in(self) -> tuple[str, ...]:
        """The projections whose output features belong to heads (q, k, v, or the fused one)."""
        return (self.qkv,) if self.qkv else tuple(n for n in (self.q, self.k, self.v) if n)


ARCHS = (
    ArchSpec("bert", ("intermediate.dense",), ("output.dense",), "intermediate_size",
             q="attention.self.query", k="attention.self.key", v="attention.self.value", o="attention.output.dense",
             heads_refusal="BERT-style attention derives head size as hidden_size / num_attention_heads"),
    ArchSpec("llama", ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",), "intermediate_size",
             q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj"),
    ArchSpec("gpt2", ("mlp.c_fc",), ("mlp.c_proj",), "n_inner", qkv="attn.c_attn", o="attn.c_proj",
             heads_refusal="GPT-2 attention fuses q/k/v in c_attn and derives head size as hidden_size / n_head"),
)


def is_transposed(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D`` stores its weight as ``[in, out]``."""
    return type(module).__name__ == "Conv1D"


@dataclass
class BlockLayout:
    """The model's repeated blocks: their container, names and architecture (``arch`` is None only for
    ``block_layout(model, known_only=False)`` on a model whose blocks it does not recognise)."""

    arch: Optional[ArchSpec]
    container: str  # module name of the ModuleList
    blocks: list[str]
    modules: dict[str, nn.Module]
    config: object

    def module(self, name: str) -> nn.Module:
        return self.modules[name]

    def ffn_modules(self, block: str) -> tuple[list[str], Optional[str]]:
        """Full names of ``block``'s FFN input projections (those present) and its output projection."""
        if self.arch is None:
            return [], None
        ins = [f"{block}.{n}" for n in self.arch.ffn_in if f"{block}.{n}" in self.modules]
        return ins, f"{block}.{self.arch.ffn_out[0]}"

    def attention_modules(self, block: str) -> tuple[list[str], Optional[str]]:
        """Full names of ``block``'s q/k/v (or fused qkv) projections and its attention output projection;
        ``([], None)`` where they are not all there."""
        if self.arch is None or self.arch.o is None:
            return [], None
        ins = [f"{block}.{n}" for n in self.arch.attention_in]
        out = f"{block}.{self.arch.o}"
        if not ins or any(n not in self.modules for n in (*ins, out)):
            return [], None
        return ins, out


def _match_arch(block: nn.Module) -> Optional[ArchSpec]:
    names = {n for n, _ in block.named_modules()}
    for arch in ARCHS:
        if arch.ffn_out[0] in names and any(n in names for n in arch.ffn_in):
            return arch
    return None


def _largest_module_list(modules: dict[str, nn.Module]) -> Optional[str]:
    best = None
    for name, module in modules.items():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[1]:
                best = (name, size)
    return None if best is None else best[0]


def block_layout(model: nn.Module, *, known_only: bool = True) -> BlockLayout:
    """Find the ``nn.ModuleList`` of transformer blocks and recognise their architecture.

    ``known_only=False`` (analysis): a model whose blocks match no architecture gets the ``nn.ModuleList``
    holding the most parameters as its blocks, with ``arch=None`` (no units), instead of an error.
    """
    model = unwrap_model(model)
    modules = dict(model.named_modules())
    best = None
    for name, module in modules.items():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            arch = _match_arch(module[0])
            if arch is not None and all(_match_arch(m) is arch for m in module):
                if best is None or len(module) > len(modules[best[0]]):
                    best = (name, arch)
    if best is None and not known_only:
        container = _largest_module_list(modules)
        if container is not None:
            best = (container, None)
    if best is None:
        if not known_only:
            return BlockLayout(None, "", [], modules, getattr(model, "config", None))
        raise StructuredUnitsError(
            "structured pruning found no transformer blocks it knows: expected an nn.ModuleList of blocks with "
            "BERT (intermediate.dense / output.dense), Llama (mlp.gate_proj / up_proj / down_proj) or GPT-2 "
            "(mlp.c_fc / mlp.c_proj) feed-forward modules"
        )
    container, arch = best
    blocks = [f"{container}.{i}" if container else str(i) for i in range(len(modules[container]))]
    return BlockLayout(arch, container, blocks, modules, getattr(model, "config", None))


def _linear_span(layout: BlockLayout, name: str, param_name: str, output_side: bool, size: int) -> Optional[Span]:
    """Span of a Linear/Conv1D's weight or bias along its output (rows) or input (columns) features."""
    module = layout.modules[name]
    param = getattr(module, param_name, None)
    if param is None:
        return None
    if param_name == "bias":
        if not output_side:
            return None
        return Span(name, "bias", param, 0, size)
    transposed = is_transposed(module)
    dim = (1 if transposed else 0) if output_side else (0 if transposed else 1)
    return Span(name, "weight", param, dim, size)


def _ffn_groups(layout: BlockLayout) -> list[UnitGroup]:
    groups = []
    for layer, block in enumerate(layout.blocks):
        spans = []
        ins, out = layout.ffn_modules(block)
        for name in ins:
            spans += [s for s in (_linear_span(layout, name, "weight", True, 1), _linear_span(layout, name, "bias", True, 1)) if s]
        spans.append(_linear_span(layout, out, "weight", False, 1))
        n_units = spans[0].param.shape[spans[0].dim]
        groups.append(UnitGroup("ffn_neurons", layer, block, n_units, spans))
    return groups


def head_geometry(config) -> tuple[int, int, int]:
    """``(heads, kv heads, head_dim)`` of any BERT / Llama / GPT-2 config (head_dim derived as hidden / heads
    where the config has none); zeros where the config does not say."""
    heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0) or 0)
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 0)
    head_dim = int(getattr(config, "head_dim", 0) or (hidden // heads if heads else 0))
    kv = int(getattr(config, "num_key_value_heads", 0) or heads)
    return heads, kv, head_dim


def heads_config(config) -> tuple[int, int, int]:
    """``(num_attention_heads, num_key_value_heads, head_dim)`` from a config that has its own ``head_dim``."""
    return head_geometry(config)


def _head_groups(layout: BlockLayout) -> list[UnitGroup]:
    arch, config = layout.arch, layout.config
    if arch.heads_refusal or arch.q is None:
        raise StructuredUnitsError(
            f"granularity='attention_heads' is not supported for this {arch.name} model: {arch.heads_refusal}, so a "
            "config cannot describe fewer heads with the same hidden size (transformers 5 has no pruned_heads). "
            "Use granularity='ffn_neurons' or granularity='blocks'"
        )
    if config is None or getattr(config, "head_dim", None) is None or getattr(config, "num_attention_heads", None) is None:
        raise StructuredUnitsError(
            "granularity='attention_heads' needs model.config with head_dim and num_attention_heads "
            "(Llama-family); this model has none. Use granularity='ffn_neurons' or granularity='blocks'"
        )
    heads, kv, head_dim = heads_config(config)
    if heads % kv:
        raise StructuredUnitsError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    rep = heads // kv
    groups = []
    for layer, block in enumerate(layout.blocks):
        q, k, v, o = (f"{block}.{n}" for n in (arch.q, arch.k, arch.v, arch.o))
        spans = []
        for name, size in ((q, rep * head_dim), (k, head_dim), (v, head_dim)):
            spans += [s for s in (_linear_span(layout, name, "weight", True, size),
                                  _linear_span(layout, name, "bias", True, size)) if s]
        spans.append(_linear_span(layout, o, "weight", False, rep * head_dim))
        for s in spans:
            if s.param.shape[s.dim] != kv * s.size:
                raise StructuredUnitsError(
                    f"{s.name} has {s.param.shape[s.dim]} entries along dim {s.dim}, expected {kv} KV groups x {s.size} "
                    f"(num_attention_heads={heads}, num_key_value_heads={kv}, head_dim={head_dim}); was it already cut?"
                )
        groups.append(UnitGroup("attention_heads", layer, block, kv, spans))
    return groups


def _block_groups(layout: BlockLayout) -> list[UnitGroup]:
    groups = []
    for layer, block in enumerate(layout.blocks):
        module = layout.modules[block]
        spans = []
        for pname, param in module.named_parameters():
            mod, _, leaf = pname.rpartition(".")
            spans.append(Span(f"{block}.{mod}" if mod else block, leaf, param, None, 1))
        groups.append(UnitGroup("blocks", layer, block, 1, spans))
    return groups


def unit_map(model: nn.Module, kind: str) -> list[UnitGroup]:
    """One `UnitGroup` per block of ``model`` for unit ``kind`` (see the module docstring)."""
    if kind not in KINDS:
        raise StructuredUnitsError(f"unit kind {kind!r} is unknown; valid: {', '.join(KINDS)}")
    layout = block_layout(model)
    return {"ffn_neurons": _ffn_groups, "attention_heads": _head_groups, "blocks": _block_groups}[kind](layout)
