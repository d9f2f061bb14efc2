"""`slim`: cut removed structured units out of a model, in place, and rewrite its config.

After ``slim(model, keep)`` the model is an ordinary dense model with smaller
``nn.Linear`` / ``Conv1D`` weights (biases cut alike) and fewer blocks, and its
``config`` describes exactly those shapes, so::

    model.save_pretrained(out); AutoModelFor...from_pretrained(out)

rebuilds it with no custom loader. Its outputs equal those of the *masked* model
(removed units zeroed, removed blocks skipped) up to float rounding.

``keep`` maps a unit kind (:mod:`.units`) to what is kept (``True`` = kept):

* ``"ffn_neurons"`` / ``"attention_heads"``: one bool tensor per block (``[n_units]``);
* ``"blocks"``: one bool per block.

Kinds left out keep everything. A removed block takes its neurons and heads with it;
the width masks of removed blocks are ignored.

Width must be **uniform**: every remaining block keeps the same number of neurons (and
of KV groups), because a plain config has one ``intermediate_size`` and one
``num_attention_heads`` / ``num_key_value_heads``. A non-uniform keep is refused with
a `StructuredUnitsError` naming the per-block counts (it is not padded); nothing is
changed then. Which neurons are kept may differ per block.

Config fields rewritten: the FFN width (``intermediate_size``; GPT-2 ``n_inner``),
``num_attention_heads`` and ``num_key_value_heads`` (``head_dim`` stays),
``num_hidden_layers`` and per-layer lists (``layer_types``, ...), and every
``layer_idx`` attribute inside the remaining blocks (used by KV caches) is renumbered.
The model gets its own copy of the config first (every module that held the old object
gets the copy), so another model built from the same config object is left as it was.

Call it after training: the optimizer's references to the old parameters are stale
afterwards.
"""

from __future__ import annotations

import copy
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from ..targets import unwrap_model
from .units import KINDS, StructuredUnitsError, block_layout, heads_config, unit_map

#: per-layer config lists subset when blocks are removed (only when their length is the number of layers)
PER_LAYER_FIELDS = ("layer_types", "no_rope_layers", "attention_types_per_layer")
#: attention-module attributes that count heads (updated when KV groups are cut)
_HEAD_ATTRS = ("num_heads", "num_attention_heads")
_KV_ATTRS = ("num_key_value_heads", "num_kv_heads")


def _as_bools(value, n: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(value).detach().to("cpu").reshape(-1)
    if t.dtype != torch.bool:
        raise StructuredUnitsError(f"{what} must be bool (True = kept), got dtype {t.dtype}")
    if t.numel() != n:
        raise StructuredUnitsError(f"{what} has {t.numel()} entries, expected {n}")
    return t


def _uniform(counts: dict[int, int], kind: str, field_desc: str) -> int:
    values = sorted(set(counts.values()))
    if len(values) > 1:
        per = ", ".join(f"block {i}: {c}" for i, c in counts.items())
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
    weight = module.weight
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    elif type(module).__name__ == "Conv1D":  # weight [in, out]
        if hasattr(module, "nx"):
            module.nx = weight.shape[0]
        module.nf = weight.shape[1]


def _own_config(model: nn.Module, config):
    """Give ``model`` (and its submodules holding ``config``) a private copy of ``config``."""
    if config is None:
        return None
    mine = copy.deepcopy(config)
    for module in model.modules():
        if getattr(module, "config", None) is config:
            module.config = mine
    return mine


def _plan(model, keep):
    """Validate ``keep`` against the model; returns what to cut (nothing is modified)."""
    unknown = [k for k in keep if k not in KINDS]
    if unknown:
        raise StructuredUnitsError(f"keep has unknown unit kinds {unknown}; valid: {', '.join(KINDS)}")
    layout = block_layout(model)
    n_layers = len(layout.blocks)
    blocks_kept = _as_bools(keep["blocks"], n_layers, "keep['blocks']") if keep.get("blocks") is not None else \
        torch.ones(n_layers, dtype=torch.bool)
    if not bool(blocks_kept.any()):
        raise StructuredUnitsError("keep['blocks'] removes every block; keep at least one")
    if not bool(blocks_kept.all()) and layout.arch.name == "gpt2" and \
            getattr(layout.config, "scale_attn_by_inverse_layer_idx", False):
        raise StructuredUnitsError(
            "cannot remove blocks of a GPT-2 with scale_attn_by_inverse_layer_idx=True: its attention scale depends "
            "on the layer index, which changes when blocks are removed"
        )
    widths = {}
    for kind in ("ffn_neurons", "attention_heads"):
        if keep.get(kind) is None:
            continue
        groups = unit_map(model, kind)
        masks = list(keep[kind])
        if len(masks) != len(groups):
            raise StructuredUnitsError(f"keep[{kind!r}] has {len(masks)} entries, expected one per block ({len(groups)})")
        masks = [_as_bools(m, g.n_units, f"keep[{kind!r}][{g.layer}]") for m, g in zip(masks, groups)]
        counts = {g.layer: int(m.sum()) for g, m in zip(groups, masks) if blocks_kept[g.layer]}
        field_desc = "FFN width (intermediate_size)" if kind == "ffn_neurons" else "num_key_value_heads"
        width = _uniform(counts, kind, field_desc)
        if width < groups[0].n_units:
            widths[kind] = (groups, masks, width)
    return layout, blocks_kept, widths


@torch.no_grad()
def slim(model: nn.Module, keep: Mapping[str, Optional[Sequence]]) -> dict:
    """Cut the units ``keep`` marks as removed out of ``model`` in place; rewrite its config.

    Returns a summary: ``params_before``, ``params_after``, ``config`` (``field: [old, new]``),
    ``kept`` (per kind: units kept per remaining block; blocks: indices of the kept blocks).
    """
    model = unwrap_model(model)
    layout, blocks_kept, widths = _plan(model, keep)
    config = _own_config(model, layout.config)
    params_before = sum(p.numel() for p in model.parameters())
    changes: dict[str, list] = {}

    def set_config(field: str, value) -> None:
        if config is None:
            return
        old = getattr(config, field, None)
        if old != value:
            setattr(config, field, value)
            changes[field] = [old, value]

    for kind, (groups, masks, width) in widths.items():
        for group, kept in zip(groups, masks):
            if not blocks_kept[group.layer]:
                continue
            units = kept.nonzero().reshape(-1)
            touched = {}
            for span in group.spans:
                module = layout.modules[span.module]
                index = span.unit_index(units).to(span.param.device)
                _set_param(module, span.param_name, span.param.index_select(span.dim, index))
                touched[span.module] = module
            for module in touched.values():
                _refresh_features(module)
        if kind == "ffn_neurons":
            set_config(layout.arch.ffn_config_field, width)
        else:
            heads, kv, _ = heads_config(config)
            rep = heads // kv
            set_config("num_attention_heads", width * rep)
            set_config("num_key_value_heads", width)
            for i, block in enumerate(layout.blocks):
                if blocks_kept[i]:
                    attn = layout.modules[f"{block}.{layout.arch.q.rpartition('.')[0]}"]
                    for attr in _HEAD_ATTRS:
                        if isinstance(getattr(attn, attr, None), int):
                            setattr(attn, attr, width * rep)
                    for attr in _KV_ATTRS:
                        if isinstance(getattr(attn, attr, None), int):
                            setattr(attn, attr, width)

    kept_blocks = [i for i in range(len(layout.blocks)) if blocks_kept[i]]
    if len(kept_blocks) < len(layout.blocks):
        container = layout.modules[layout.container]
        new = nn.ModuleList([container[i] for i in kept_blocks])
        parent_name, _, attr = layout.container.rpartition(".")
        parent = layout.modules[parent_name] if parent_name else model
        setattr(parent, attr, new)
        for new_index, block in enumerate(new):
            for module in block.modules():
                if isinstance(getattr(module, "layer_idx", None), int) and not isinstance(module.layer_idx, bool):
                    module.layer_idx = new_index
        old_layers = len(layout.blocks)
        if config is not None:
            for field in PER_LAYER_FIELDS:
                value = getattr(config, field, None)
                if isinstance(value, (list, tuple)) and len(value) == old_layers:
                    set_config(field, type(value)(value[i] for i in kept_blocks))
        set_config("num_hidden_layers", len(kept_blocks))

    kept = {kind: width for kind, (_, _, width) in widths.items()}
    kept["blocks"] = kept_blocks
    return {
        "params_before": params_before,
        "params_after": sum(p.numel() for p in model.parameters()),
        "config": changes,
        "kept": kept,
    }
