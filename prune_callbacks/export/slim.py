"""`slim`: cut removed structured units out of a model, in place, and rewrite its config.

After ``slim(model, keep)`` the model is an ordinary dense model with smaller
``nn.Linear`` / ``Conv1D`` weights (biases cut alike) and fewer blocks, and its
``config`` describes exactly those shapes, so::

    model.save_pretrained(out); AutoModelFor...from_pretrained(out)

rebuilds it with no custom loader. Its outputs equal those of the *masked* model
(removed units zeroed, removed blocks skipped) up to float rounding.

``keep`` maps a unit kind (:mod:`.units`) to what is kept (``True`` = kept):

* ``"ffn_neurons"`` / ``"attention_heads"``: one bool tensor per unit group of
  :func:`.units.unit_map` (``[n_units]``; one per block, one per attention for heads);
* ``"blocks"``: one bool per block.

Kinds left out keep everything. A removed block takes its neurons and heads with it;
the width masks of removed blocks are ignored.

Width must be **uniform**: every remaining block keeps the same number of neurons (and
of KV groups), because a plain config has one ``intermediate_size`` and one
``num_attention_heads`` / ``num_key_value_heads``. A non-uniform keep is refused with
a `StructuredUnitsError` naming the per-block counts (it is not padded); nothing is
changed then. Which neurons are kept may differ per block.

Config fields rewritten are the family's (:mod:`.families`): the FFN width
(``intermediate_size``, GPT-2 ``n_inner``, OPT ``ffn_dim``, T5 ``d_ff``, DistilBERT
``hidden_dim``), the head counts (``num_attention_heads`` / ``num_key_value_heads``,
T5 ``num_heads``) with the head size written out (``head_dim``, ``d_kv``), the block
counts per block list (``num_hidden_layers``, ``n_layer``, T5 ``num_layers`` /
``num_decoder_layers``) and per-layer lists (``layer_types``, ...); every ``layer_idx``
attribute inside the remaining blocks (used by KV caches) is renumbered per block list.
Norms over a whole projection (OLMo-2 ``q_norm``/``k_norm``) are cut with the heads and
their weights scaled by ``sqrt(old width / new width)``, so the root-mean-square over
the fewer remaining entries gives the masked model's values (exact up to the norm's eps).
A model without a config (the user's own) is cut in place; save its ``state_dict``.
The model gets its own copy of the config first (every module that held the old object
gets the copy), so another model built from the same config object is left as it was.

Call it after training: the optimizer's references to the old parameters are stale
afterwards.
"""

from __future__ import annotations

import copy
import math
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from prune_callbacks.core.targets import is_transposed, unwrap_model
from prune_callbacks.core.families import HEAD_ATTRS, KV_ATTRS, WIDTH_ATTRS, Family
from prune_callbacks.methods.structured.units import KINDS, WIDTH_KINDS, StructuredUnitsError, block_layout, head_geometry, owned_by_stack, unit_map

#: kept for callers of the old name; the per-family list is `Family.per_layer_fields`
from prune_callbacks.core.families import PER_LAYER_FIELDS  # noqa: E402,F401


def _as_bools(value, n: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(value).detach().to("cpu").reshape(-1)
    if t.dtype != torch.bool:
        raise StructuredUnitsError(f"{what} must be bool (True = kept), got dtype {t.dtype}")
    if t.numel() != n:
        raise StructuredUnitsError(f"{what} has {t.numel()} entries, expected {n}")
    return t


def _uniform(counts: dict[str, int], kind: str, field_desc: str) -> int:
    values = sorted(set(counts.values()))
    if len(values) > 1:
        per = ", ".join(f"{name}: {c}" for name, c in counts.items())
        raise StructuredUnitsError(
            f"cannot slim a non-uniform {kind} keep ({per}): a plain config has one {field_desc} for every block. "
            f"Prune with the default uniform per-block selection (the same count removed in every block) to slim"
        )
    if values and values[0] == 0:
        raise StructuredUnitsError(
            f"the {kind} keep removes every unit of a remaining block; remove that block with 'blocks' instead"
        )
    return values[0] if values else 0


def _set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def _refresh_features(module: nn.Module) -> None:
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    elif is_transposed(module):  # weight [in, out]
        if hasattr(module, "nx"):
            module.nx = weight.shape[0]
        module.nf = weight.shape[1]
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = weight.shape[1]
    if weight is not None and weight.dim() == 1:
        for attr in ("normalized_shape", "hidden_size", "dim"):
            value = getattr(module, attr, None)
            if isinstance(value, tuple) and len(value) == 1:
                setattr(module, attr, (weight.shape[0],))
            elif isinstance(value, int) and not isinstance(value, bool):
                setattr(module, attr, weight.shape[0])


def _own_config(model: nn.Module, config):
    """Give ``model`` (and its submodules holding ``config``) a private copy of ``config``."""
    if config is None:
        return None
    mine = copy.deepcopy(config)
    for module in model.modules():
        if getattr(module, "config", None) is config:
            module.config = mine
    return mine


def _plan(model, keep, family):
    """Validate ``keep`` against the model; returns what to cut (nothing is modified)."""
    unknown = [k for k in keep if k not in KINDS]
    if unknown:
        raise StructuredUnitsError(f"keep has unknown unit kinds {unknown}; valid: {', '.join(KINDS)}")
    layout = block_layout(model, family=family)
    n_layers = len(layout.blocks)
    blocks_kept = _as_bools(keep["blocks"], n_layers, "keep['blocks']") if keep.get("blocks") is not None else \
        torch.ones(n_layers, dtype=torch.bool)
    for stack, blocks in layout.stacks:
        if not any(bool(blocks_kept[layout.blocks.index(b)]) for b in blocks):
            raise StructuredUnitsError(
                f"keep['blocks'] removes every block of {stack or 'the model'}; keep at least one")
    if not bool(blocks_kept.all()):
        for flag, why in layout.family.block_refusals:
            if getattr(layout.config, flag, False):
                raise StructuredUnitsError(
                    f"cannot remove blocks of a {layout.family.name} model with {flag}=True: {why}")
    widths = {}
    for kind in WIDTH_KINDS:
        if keep.get(kind) is None:
            continue
        groups = unit_map(model, kind, layout=layout)
        masks = list(keep[kind])
        if len(masks) != len(groups):
            raise StructuredUnitsError(f"keep[{kind!r}] has {len(masks)} entries, expected one per unit group "
                                       f"({len(groups)}: {', '.join(g.mask_name for g in groups[:3])}, ...)")
        masks = [_as_bools(m, g.n_units, f"keep[{kind!r}][{i}] ({g.mask_name})")
                 for i, (m, g) in enumerate(zip(masks, groups))]
        counts = {(f"block {g.layer}" if g.part is None else f"{g.block if g.tied else f'block {g.layer}'} {g.part}"):
                  int(m.sum())
                  for g, m in zip(groups, masks) if blocks_kept[g.layer] or g.tied}
        fields = layout.family
        field_desc = (f"FFN width ({fields.ffn_field})" if kind == "ffn_neurons"
                      else f"head count ({fields.kv_field or fields.heads_field})")
        width = _uniform(counts, kind, field_desc)
        if width < groups[0].n_units:
            widths[kind] = (groups, masks, width)
    return layout, blocks_kept, widths


def _cut(layout, groups, masks, blocks_kept) -> None:
    for group, kept in zip(groups, masks):
        if not blocks_kept[group.layer] and not group.tied:
            continue
        units = kept.nonzero().reshape(-1)
        touched = {}
        for span in group.spans:
            module = layout.modules[span.module]
            index = span.unit_index(units).to(span.param.device)
            old = span.param.shape[span.dim]
            value = span.param.index_select(span.dim, index)
            if span.param_name == "weight" and span.param.dim() == 1 and group.kind == "attention_heads":
                value = value * math.sqrt(old / value.shape[0])  # RMS over fewer entries: see the module docstring
            _set_param(module, span.param_name, value)
            touched[span.module] = module
        for module in touched.values():
            _refresh_features(module)


def _set_attrs(module: nn.Module, heads: int, kv: int, head_size: int) -> None:
    for attrs, value in ((HEAD_ATTRS, heads), (KV_ATTRS, kv), (WIDTH_ATTRS, heads * head_size)):
        for attr in attrs:
            if isinstance(getattr(module, attr, None), int) and not isinstance(getattr(module, attr), bool):
                setattr(module, attr, value)


@torch.no_grad()
def slim(model: nn.Module, keep: Mapping[str, Optional[Sequence]], family: Optional[Family] = None) -> dict:
    """Cut the units ``keep`` marks as removed out of ``model`` in place; rewrite its config.

    ``family``: the user's own unit description (:mod:`.description`; default: the family table).
    Returns a summary: ``params_before``, ``params_after``, ``config`` (``field: [old, new]``),
    ``kept`` (per kind: units kept per remaining block; blocks: indices of the kept blocks).
    """
    model = unwrap_model(model)
    layout, blocks_kept, widths = _plan(model, keep, family)
    fam = layout.family
    config = _own_config(model, layout.config)
    params_before = sum(p.numel() for p in model.parameters())
    changes: dict[str, list] = {}

    def set_config(field: Optional[str], value) -> None:
        if config is None or not field:
            return
        old = getattr(config, field, None)
        if old != value:
            setattr(config, field, value)
            changes[field] = [old, value]

    for kind, (groups, masks, width) in widths.items():
        if kind == "attention_heads":
            heads, kv, head_size = head_geometry(layout.config, fam)
        _cut(layout, groups, masks, blocks_kept)
        if kind == "ffn_neurons":
            set_config(fam.ffn_field, width)
            continue
        rep = heads // kv
        set_config(fam.heads_field, width * rep)
        set_config(fam.kv_field, width)
        set_config(fam.head_size_field, head_size)  # written out: a config that derived it would now derive wrong
        for group in groups:
            for module in group.modules:
                _set_attrs(layout.modules[module], width * rep, width, head_size)

    kept_blocks = [i for i in range(len(layout.blocks)) if blocks_kept[i]]
    if len(kept_blocks) < len(layout.blocks):
        single = len(layout.stacks) == 1
        for stack, blocks in layout.stacks:
            indices = [layout.blocks.index(b) for b in blocks]
            kept_here = [i for i in indices if blocks_kept[i]]
            if len(kept_here) == len(indices):
                continue
            _move_owned(layout, blocks[0], layout.blocks[kept_here[0]])
            new = nn.ModuleList([layout.modules[layout.blocks[i]] for i in kept_here])
            parent_name, _, attr = stack.rpartition(".")
            parent = layout.modules[parent_name] if parent_name else model
            setattr(parent, attr, new)
            for new_index, block in enumerate(new):
                for module in block.modules():
                    if isinstance(getattr(module, "layer_idx", None), int) and not isinstance(module.layer_idx, bool):
                        module.layer_idx = new_index
            if config is not None and single:
                for field in fam.per_layer_fields:
                    value = getattr(config, field, None)
                    if isinstance(value, (list, tuple)) and len(value) == len(indices):
                        set_config(field, type(value)(value[i] for i in kept_here))
            set_config(fam.layers_field(stack), len(kept_here))

    kept = {kind: width for kind, (_, _, width) in widths.items()}
    kept["blocks"] = kept_blocks
    return {
        "params_before": params_before,
        "params_after": sum(p.numel() for p in model.parameters()),
        "config": changes,
        "kept": kept,
    }


def _move_owned(layout, first: str, new_first: str) -> None:
    """Hand what the stack's first block owns for the stack (T5's position bias) to its new first block."""
    if first == new_first:
        return
    flags = dict(layout.family.stack_owned)
    for name in owned_by_stack(layout, first):
        path = name[len(first) + 1:]
        parent_path, _, leaf = path.rpartition(".")
        old_parent = layout.modules[f"{first}.{parent_path}"]
        new_parent = layout.modules[f"{new_first}.{parent_path}"]
        setattr(new_parent, leaf, getattr(old_parent, leaf))
        if flags.get(path):
            setattr(new_parent, flags[path], True)
