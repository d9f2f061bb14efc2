"""Unit maps: which slices of which tensors one structured unit spans, read from a `Family` entry.

A *unit* is what structured pruning removes as a whole:

* ``ffn_neurons``: one intermediate neuron of a block's feed-forward network: its row
  (Linear) / column (GPT-2 ``Conv1D``, weight stored ``[in, out]``) in every input
  projection (both halves of a fused ``gate_up_proj``) with its bias entries, and its
  column (Linear) / row (Conv1D) in the output projection;
* ``attention_heads``: one KV group of an attention (grouped-query attention: the
  group's K and V heads together with the ``heads // kv_heads`` query heads that read
  them; without GQA that is one head): its rows of q/k/v (or its slices of each third
  of a fused ``qkv``), biases included, its columns of the output projection, and the
  slices of the norms / tables that go with heads. Only where the config has a head
  size of its own (``head_dim``, T5 ``d_kv``, DeBERTa-v2 ``attention_head_size``);
  BERT, GPT-2, OPT, DistilBERT and ViT derive it as hidden / heads, so this is refused
  there (use ``ffn_neurons`` or ``blocks``);
* ``blocks``: one whole transformer block (every parameter in it but the ones its
  stack owns, see :mod:`.families`).

`unit_map(model, kind)` returns the `UnitGroup` s of a kind (one per block; one per
attention for heads, so a T5 decoder block has two): how many units each has and the
`Span` s (tensor slices) they cover. Unit ``i`` covers, in every `Segment` of a span,
the indices ``[offset + i * size, offset + (i + 1) * size)`` along ``dim``
(``dim=None``: the whole tensor). Masks (:mod:`prune_callbacks.methods.granularity.structured`),
the physical cut (:mod:`.slim`) and the analysis all read this one description, built
from the family table (:mod:`.families`) or the user's own (:mod:`.description`); where the
blocks and their projections are comes from :mod:`.layout` (`block_layout`).

Pure torch: the architecture is recognised by module names and read from the model's
``config`` duck-typed (``transformers`` is never imported).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from prune_callbacks.core.targets import is_transposed
from prune_callbacks.core.families import Family, StructuredUnitsError
from prune_callbacks.methods.structured.layout import BlockLayout, block_layout, owned_by_stack

WIDTH_KINDS = ("ffn_neurons", "attention_heads")
#: the structured unit kinds (the one list: granularities, slim's keep and the analysis read it)
KINDS = (*WIDTH_KINDS, "blocks")

__all__ = ["KINDS", "WIDTH_KINDS", "BlockLayout", "Segment", "Span", "StructuredUnitsError", "UnitGroup",
           "block_layout", "head_geometry", "is_transposed", "owned_by_stack", "unit_map"]


@dataclass(frozen=True)
class Segment:
    """``size`` entries per unit starting at ``offset``; ``heads``: query heads in one unit's slice (1 for K/V)."""

    offset: int
    size: int
    heads: int = 1


@dataclass(frozen=True)
class Span:
    """Slices of one parameter spanned by a group's units (one or more segments along ``dim``)."""

    module: str  # full module name
    param_name: str  # "weight" / "bias"
    param: torch.Tensor = field(compare=False, repr=False)
    dim: Optional[int]  # None: the whole tensor belongs to the (single) unit
    segments: tuple[Segment, ...] = (Segment(0, 1),)

    @property
    def name(self) -> str:
        return f"{self.module}.{self.param_name}"

    @property
    def size(self) -> int:
        """Entries along ``dim`` one unit spans (all segments)."""
        return sum(s.size for s in self.segments)

    def unit_index(self, units: torch.Tensor) -> torch.Tensor:
        """Indices along ``dim`` covered by the given unit numbers, segment by segment (ascending for sorted units)."""
        units = units.to(torch.long).reshape(-1, 1)
        return torch.cat([(s.offset + units * s.size + torch.arange(s.size, device=units.device)).reshape(-1)
                          for s in self.segments])

    def unit_view(self, tensor: torch.Tensor, n_units: int) -> torch.Tensor:
        """``tensor`` (shaped like the parameter) as ``[n_units, -1]`` along this span's dimension."""
        if self.dim is None:
            return tensor.reshape(1, -1)
        moved = tensor.movedim(self.dim, 0)
        return torch.cat([moved.narrow(0, s.offset, n_units * s.size).reshape(n_units, -1) for s in self.segments], 1)

    def segment_views(self, tensor: torch.Tensor, n_units: int) -> list[tuple[Segment, torch.Tensor]]:
        """Per segment, ``tensor`` as ``[n_units, size, rest]`` (the analysis splits query heads with it)."""
        moved = tensor.movedim(self.dim, 0)
        return [(s, moved.narrow(0, s.offset, n_units * s.size).reshape(n_units, s.size, -1)) for s in self.segments]


@dataclass
class UnitGroup:
    """The units of one kind in one block (or one attention of a block)."""

    kind: str
    layer: int  # block index over all block lists of the model
    block: str  # the block's module name
    n_units: int
    spans: list[Span]
    part: Optional[str] = None  # the attention module (relative to the block) where a block has several
    module: Optional[str] = None  # heads: the attention module whose head-count attributes change
    modules: tuple[str, ...] = ()  # tied heads: every attention module of the stack the group spans
    tied: bool = False  # one unit spans every block of a stack (see `Family.tied_heads`)

    @property
    def mask_name(self) -> str:
        return f"{self.block}:{self.kind}" if self.part is None else f"{self.block}:{self.kind}:{self.part}"

    @property
    def label(self) -> str:
        """Where the units are, for reports: the block, ``block.attention`` where a block has several attentions,
        ``stack.*.attention`` for heads tied across a stack."""
        if self.part is None:
            return self.block
        return f"{self.block}.*.{self.part}" if self.tied else f"{self.block}.{self.part}"


def _proj_span(layout: BlockLayout, name: str, param_name: str, output_side: bool,
               segments: tuple[Segment, ...]) -> Optional[Span]:
    """Span of a Linear/Conv1D's weight or bias along its output (rows) or input (columns) features."""
    module = layout.modules[name]
    param = getattr(module, param_name, None)
    if not isinstance(param, torch.Tensor):
        return None
    if param.dim() == 1:
        return Span(name, param_name, param, 0, segments) if output_side else None
    transposed = is_transposed(module)
    dim = (1 if transposed else 0) if output_side else (0 if transposed else 1)
    return Span(name, param_name, param, dim, segments)


def _cfg(config, name: Optional[str]) -> int:
    value = getattr(config, name, None) if (config is not None and name) else None
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else 0


def head_geometry(config, family: Family) -> tuple[int, int, int]:
    """``(heads, kv heads, head size)`` read from ``config`` through ``family``'s fields (head size derived as
    hidden / heads where the config has none; the description's own numbers where there is no config)."""
    heads = _cfg(config, family.heads_field)
    if not heads and family.geometry:
        return family.geometry
    hidden = _cfg(config, family.hidden_field)
    size = _cfg(config, family.head_size_field) or (hidden // heads if heads else 0)
    return heads, _cfg(config, family.kv_field) or heads, size


def _ffn_groups(layout: BlockLayout) -> list[UnitGroup]:
    family = layout.family
    groups = []
    for layer, block in enumerate(layout.blocks):
        ins, out = layout.ffn_modules(block)
        first = _proj_span(layout, ins[0], "weight", True, (Segment(0, 1),))
        width = first.param.shape[first.dim]
        if width % family.ffn_parts:
            raise StructuredUnitsError(f"{ins[0]} has {width} output features, not {family.ffn_parts} equal parts")
        n = width // family.ffn_parts
        fused = tuple(Segment(p * n, 1) for p in range(family.ffn_parts))
        spans = [s for name in ins for s in (_proj_span(layout, name, "weight", True, fused),
                                             _proj_span(layout, name, "bias", True, fused)) if s]
        spans.append(_proj_span(layout, out, "weight", False, (Segment(0, 1),)))
        _check_spans(spans, n, f"{family.ffn_field or 'FFN width'}={n}")
        groups.append(UnitGroup("ffn_neurons", layer, block, n, spans))
    return groups


def _check_spans(spans: list[Span], n_units: int, what: str) -> None:
    for s in spans:
        if s.dim is not None and s.param.shape[s.dim] != n_units * s.size:
            raise StructuredUnitsError(
                f"{s.name} has {s.param.shape[s.dim]} entries along dim {s.dim}, expected {n_units} units x {s.size} "
                f"({what}); was it already cut, or does the unit description not fit this model?")


def _head_groups(layout: BlockLayout, describe_only: bool = False) -> list[UnitGroup]:
    family, config = layout.family, layout.config
    if family.heads_refusal and not describe_only:
        raise StructuredUnitsError(
            f"granularity='attention_heads' is not supported for this {family.name} model: {family.heads_refusal}. "
            "Use granularity='ffn_neurons' or granularity='blocks'")
    heads, kv, d = head_geometry(config, family)
    if not (heads and d) or family.o is None:
        raise StructuredUnitsError(
            f"granularity='attention_heads' needs the head count and head size ({family.heads_field}, "
            f"{family.head_size_field}) in model.config; this {family.name} model has none. "
            "Use granularity='ffn_neurons' or granularity='blocks'")
    if heads % kv:
        raise StructuredUnitsError(f"{family.heads_field}={heads} is not a multiple of the KV heads ({kv})")
    rep = heads // kv
    q_seg, kv_seg = (Segment(0, rep * d, rep),), (Segment(0, d),)
    what = f"{heads} heads, {kv} KV heads, head size {d}"
    groups, tied = [], {}
    for layer, block in enumerate(layout.blocks):
        attentions = layout.attentions(block)
        for ins, out in attentions:
            attn = ins[0].rpartition(".")[0]
            spans = []
            if family.qkv:
                fused = (Segment(0, rep * d, rep), Segment(heads * d, d), Segment(heads * d + kv * d, d))
                spans += [s for p in ("weight", "bias") for s in [_proj_span(layout, ins[0], p, True, fused)] if s]
            else:
                for name, seg in zip(ins, (q_seg, kv_seg, kv_seg)):
                    spans += [s for p in ("weight", "bias") for s in [_proj_span(layout, name, p, True, seg)] if s]
            for extra in family.head_extras:
                if f"{attn}.{extra}" in layout.modules:
                    spans += [s for p in ("weight", "bias")
                              for s in [_proj_span(layout, f"{attn}.{extra}", p, True, q_seg)] if s]
            spans.append(_proj_span(layout, out, "weight", False, q_seg))
            for norm, side in family.head_norms:
                weight = getattr(layout.modules.get(f"{attn}.{norm}"), "weight", None)
                if isinstance(weight, torch.Tensor):
                    seg = q_seg if side == "q" else kv_seg
                    if weight.numel() == kv * seg[0].size:  # normalises the whole projection: spans the heads
                        spans.append(Span(f"{attn}.{norm}", "weight", weight, 0, seg))
                    elif weight.numel() != d:  # one head's worth: shared by every head, spans nothing
                        raise StructuredUnitsError(
                            f"{attn}.{norm}.weight has {weight.numel()} entries: neither one head ({d}) nor the whole "
                            f"projection ({kv * seg[0].size})")
            for table in family.head_tables:
                weight = getattr(layout.modules.get(f"{attn}.{table}"), "weight", None)
                if isinstance(weight, torch.Tensor):
                    spans.append(Span(f"{attn}.{table}", "weight", weight, 1, (Segment(0, rep, rep),)))
            _check_spans(spans, kv, what)
            rel = attn[len(block) + 1:]
            if any(re.fullmatch(p, rel) for p in family.tied_heads):
                stack = layout.stack_of(block)
                key = (stack, rel)
                if key in tied:
                    tied[key].spans.extend(spans)
                    tied[key].modules += (attn,)
                    continue
                tied[key] = UnitGroup("attention_heads", layer, stack, kv, spans, part=rel, module=attn,
                                      modules=(attn,), tied=True)
                groups.append(tied[key])
                continue
            part = rel if len(attentions) > 1 else None
            groups.append(UnitGroup("attention_heads", layer, block, kv, spans, part=part, module=attn,
                                    modules=(attn,)))
    return groups


def _block_groups(layout: BlockLayout) -> list[UnitGroup]:
    groups = []
    for layer, block in enumerate(layout.blocks):
        owned = tuple(f"{o}." for o in owned_by_stack(layout, block))
        spans = []
        for pname, param in layout.modules[block].named_parameters():
            mod, _, leaf = pname.rpartition(".")
            full = f"{block}.{mod}" if mod else block
            if not f"{full}.".startswith(owned):
                spans.append(Span(full, leaf, param, None))
        groups.append(UnitGroup("blocks", layer, block, 1, spans))
    return groups


def unit_map(model: nn.Module, kind: str, *, family: Optional[Family] = None, describe_only: bool = False,
             layout: Optional[BlockLayout] = None) -> list[UnitGroup]:
    """The `UnitGroup` s of ``model`` for unit ``kind`` (see the module docstring).

    ``family``: a unit description of the user's own (default: the table). ``describe_only`` (analysis):
    heads are described even where a config could not describe fewer of them.
    """
    if kind not in KINDS:
        raise StructuredUnitsError(f"unit kind {kind!r} is unknown; valid: {', '.join(KINDS)}")
    layout = layout or block_layout(model, family=family)
    if kind == "attention_heads":
        return _head_groups(layout, describe_only)
    return {"ffn_neurons": _ffn_groups, "blocks": _block_groups}[kind](layout)
