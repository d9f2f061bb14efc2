"""Strategies at the same parameter budget, probed one-shot: which way of removing the same number of
weights hurts the dense model least.

For a budget ``b`` (the fraction of the targeted weights to remove: the analysed recipe's
``final_sparsity``) the candidates are every strategy the engine has that can remove ``b`` of the
weights on this model:

* ``unstructured`` (global Taylor threshold): storage only, no speed-up without sparse kernels;
* ``N:M`` (when some N:4 or N:8 pattern removes ``b`` within 0.02): sparse tensor cores on GPUs;
* ``ffn_neurons`` at the neuron fraction that removes ``b`` of the weights (at most 90%);
* ``attention_heads`` likewise, on architectures whose config can describe fewer heads (Llama);
* ``blocks``: ``round(b * n_blocks)`` whole blocks;
* ``blocks + ffn_neurons``: 1 or 2 blocks and the neuron fraction of the other blocks that makes up
  the rest of ``b``;

* ``low_rank``: every targeted Linear factorised to the ranks one global rule allocates (when the
  budget is reachable at rank 1 and every target is an ``nn.Linear``). The probe keeps mean
  ``|theta * grad|``, not the squared gradients FWSVD weighs rows by, so low rank is probed with
  plain truncated SVD ranks (``importance: none``): a pessimistic proxy for the Fisher-weighted
  ranks training uses;

the structured ones give a smaller dense model (faster everywhere), low rank two thin Linears per target. Each candidate is built with the
engine's own `Pruner` (the same configs, the same granularity code that selects units while
training), its masks selected once from the calibration saliency (mean ``|theta * grad|`` of every
spanned tensor), applied, the held-out metric measured, and the weights restored bit for bit. That
one-shot damage is a proxy: fine-tuning recovers part of it, more for fine-grained strategies, so it
ranks the strategies against each other rather than predicting their final accuracy.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from prune_callbacks.engine.pruner import Pruner
from prune_callbacks.methods.structured.masking import is_skipped, skip_block
from prune_callbacks.methods.structured.units import KINDS, StructuredUnitsError, block_layout, unit_map

STRUCTURED = KINDS  # the structured unit kinds: one list, in structured.units
_PROBE_STEPS = 100  # any run length: the probe selects masks once, at the final sparsity, and never steps
MAX_WIDTH = 0.9  # a width fraction above this leaves too little of each block to recover
_WHAT_IT_BUYS = {
    "unstructured": "storage (sparse checkpoint); no speed-up without sparse kernels",
    "N:M": "GPU sparse tensor cores (2:4); measured slower than dense on BERT-sized models",
    "structured": "a smaller dense model: less memory and faster on any CPU or GPU",
    "low_rank": "two thin Linears per target: fewer multiply-adds on any hardware; a custom loader (or densify)",
}


BUDGET_TOLERANCE = 0.03  # a candidate must remove the budget to within this fraction of the targeted weights


def _weights(groups, targeted: set[str]) -> list[int]:
    """Per block, the targeted weight elements the groups' units span."""
    return [sum(s.param.numel() for s in g.spans if s.param_name == "weight" and s.param.dim() == 2
                and s.module in targeted) for g in groups]


def _width(kind: str, fraction: float, n_units: int) -> Optional[float]:
    """The realisable unit fraction nearest ``fraction`` (uniform per block, 1 .. n-1 units), or None."""
    k = round(fraction * n_units)
    return k / n_units if 1 <= k <= n_units - 1 and k / n_units <= MAX_WIDTH else None


def unit_config(kind: str, fraction: float) -> dict:
    """One partial `PruningConfig` dict of a structured candidate: ``kind`` at ``fraction``, taylor saliency."""
    return {"granularity": kind, "final_sparsity": round(fraction, 4), "saliency": "taylor"}


def candidates(model: nn.Module, budget: float, targeted: Mapping[str, int], *, heads_ok: Optional[bool] = None
               ) -> list[dict]:
    """The candidate strategies removing ``budget`` of the targeted weights: ``[{name, kind, configs}]``.

    ``targeted``: target name -> number of weights. ``configs``: partial `PruningConfig` dicts (the caller
    adds include/exclude). Width fractions are solved from the weight counts of the units' spans and
    rounded to whole units; a candidate that cannot land within `BUDGET_TOLERANCE` of the budget is left out.
    """
    total = sum(targeted.values())
    out = [{"name": "unstructured", "kind": "unstructured",
            "configs": [{"final_sparsity": budget, "saliency": "taylor", "scope": "global"}]}]
    low_rank = _low_rank_candidate(model, budget, targeted)
    if low_rank:
        out.append(low_rank)
    for m in (4, 8):
        n = round((1 - budget) * m)
        if 0 < n < m and abs((1 - n / m) - budget) <= BUDGET_TOLERANCE:
            out.append({"name": f"{n}:{m}", "kind": "N:M", "configs": [{"granularity": f"{n}:{m}", "saliency": "taylor"}]})
            break
    try:
        layout = block_layout(model)
    except StructuredUnitsError:
        return out
    names = set(targeted)
    n_blocks = len(layout.blocks)
    ffn_groups = unit_map(model, "ffn_neurons")
    ffn = sum(_weights(ffn_groups, names)) / total  # share of the targeted weights in FFN neurons
    n_ffn = ffn_groups[0].n_units
    block = sum(_weights(unit_map(model, "blocks"), names)) / total / n_blocks  # share in one block
    if heads_ok is None:
        heads_ok = _heads_supported(model)
    heads = 0.0
    if heads_ok:
        head_groups = unit_map(model, "attention_heads")
        heads, n_heads = sum(_weights(head_groups, names)) / total, head_groups[0].n_units

    def fits(expected: float) -> bool:
        return abs(expected - budget) <= BUDGET_TOLERANCE

    f = _width("ffn_neurons", budget / ffn, n_ffn) if ffn else None
    if f is not None and fits(f * ffn):
        out.append({"name": f"ffn_neurons {f:.0%}", "kind": "ffn_neurons", "configs": [unit_config("ffn_neurons", f)]})
    if heads:
        h = _width("attention_heads", budget / heads, n_heads)
        if h is not None and fits(h * heads):
            out.append({"name": f"attention_heads {h:.0%}", "kind": "attention_heads",
                        "configs": [unit_config("attention_heads", h)]})
        h = 1 / n_heads  # one KV group (or head) per block, the rest from FFN neurons
        f = _width("ffn_neurons", (budget - h * heads) / ffn, n_ffn) if ffn and n_heads > 1 else None
        if f is not None and fits(h * heads + f * ffn):
            out.append({"name": f"attention_heads {h:.0%} + ffn_neurons {f:.0%}", "kind": "attention_heads+ffn_neurons",
                        "configs": [unit_config("ffn_neurons", f), unit_config("attention_heads", h)]})
    k = round(budget / block) if block else 0
    if 0 < k < n_blocks and fits(k * block):
        out.append({"name": f"blocks {k}/{n_blocks}", "kind": "blocks",
                    "configs": [unit_config("blocks", k / n_blocks)]})
    for k in (1, 2):  # a removed block takes its neurons along; the fraction applies to the blocks that remain
        if k >= n_blocks - 1 or not ffn:
            continue
        f = _width("ffn_neurons", (budget - k * block) / (ffn * (n_blocks - k) / n_blocks), n_ffn)
        if f is not None and f >= 0.05 and fits(k * block + f * ffn * (n_blocks - k) / n_blocks):
            out.append({"name": f"blocks {k}/{n_blocks} + ffn_neurons {f:.0%}", "kind": "blocks+ffn_neurons",
                        "configs": [unit_config("ffn_neurons", f), unit_config("blocks", k / n_blocks)]})
    return out


def _low_rank_candidate(model: nn.Module, budget: float, targeted: Mapping[str, int]) -> Optional[dict]:
    """Low rank at ``budget`` (plain-SVD ranks one-shot, see the module docstring), or None when a target is not
    an ``nn.Linear`` or rank 1 everywhere cannot remove the budget."""
    from prune_callbacks.methods.granularity.low_rank import kept_params

    modules = dict(model.named_modules())
    if not targeted or not all(isinstance(modules.get(n), nn.Linear) for n in targeted):
        return None
    floor = sum(kept_params(*modules[n].weight.shape, 1) for n in targeted)
    if budget > 1 - floor / sum(targeted.values()):
        return None
    return {"name": "low_rank", "kind": "low_rank", "configs": [{"granularity": "low_rank", "final_sparsity": budget,
                                                                "granularity_settings": {"importance": "none"}}]}


def _heads_supported(model: nn.Module) -> bool:
    try:
        Pruner(model, {"granularity": "attention_heads", "final_sparsity": 0.5}, total_steps=_PROBE_STEPS)
    except (StructuredUnitsError, ValueError):
        return False
    return True


def buys(kind: str) -> str:
    return _WHAT_IT_BUYS[kind if kind in ("unstructured", "N:M", "low_rank") else "structured"]


def is_structured(kind: str) -> bool:
    return kind not in ("unstructured", "N:M")


def _removed(pruner, targets) -> int:
    """Parameters of ``targets`` the pruner's groups remove, from the granularities' own counts (for a factorised
    weight not its zeros); a weight two groups touch (a removed block and its neurons) counts its larger figure."""
    per: dict[str, int] = {}
    for g in pruner.groups:
        for name, _, pruned in g.granularity.counts():
            per[name] = max(per.get(name, 0), pruned)
    return sum(per.get(t.name, 0) for t in targets)


@torch.no_grad()
def probe(model: nn.Module, candidate: dict, scores: Mapping[int, torch.Tensor], targets: Sequence,
          measure: Callable[[], float], include=None, exclude=()) -> dict:
    """Apply ``candidate``'s masks one-shot (from ``scores``: ``id(param)`` -> mean |theta * grad|), measure,
    restore. Returns the row: removed fraction of the targeted weights, the metric, units kept per block."""
    configs = [{**c, "include": include, "exclude": list(exclude)} for c in candidate["configs"]]
    try:
        pruner = Pruner(model, configs, total_steps=_PROBE_STEPS)
    except (StructuredUnitsError, ValueError) as exc:
        return {"name": candidate["name"], "kind": candidate["kind"], "applicable": False, "why": str(exc)}
    layout = block_layout(model, known_only=False) if any(g.granularity.name == "blocks" for g in pruner.groups) else None
    touched = {id(p): p for g in pruner.groups for p in g.granularity.params}
    saved = {i: p.detach().clone() for i, p in touched.items()}
    skipped_before = {n for n in layout.blocks if is_skipped(layout.modules[n])} if layout else set()
    try:
        for g in pruner.groups:
            gran = g.granularity
            picked = [scores[id(p)] if id(p) in scores else torch.zeros(p.shape, device=p.device) for p in gran.params]
            gran.set_masks(gran.select(picked, g.config.final_sparsity))
            gran.apply()
        removed = _removed(pruner, targets)
        value = measure()
        kept = {}
        for g in pruner.groups:
            rep = g.granularity.report()
            if "kept_per_block" in rep:
                kept[rep["units"]] = rep["kept_per_block"]
    finally:
        for i, p in touched.items():
            p.data.copy_(saved[i])
        if layout:
            for name in layout.blocks:
                if name not in skipped_before:
                    skip_block(layout.modules[name], skip=False)
    total = sum(t.param.numel() for t in targets)
    return {"name": candidate["name"], "kind": candidate["kind"], "applicable": True,
            "configs": candidate["configs"], "removed": removed / total, "metric": value,
            "kept_per_block": kept, "buys": buys(candidate["kind"])}
