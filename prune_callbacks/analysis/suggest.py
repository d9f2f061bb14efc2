"""From the measurements to a recipe: the strategy and per-layer caps, with the reasoning as comments.

The suggestion is unstructured (global saliency threshold with per-layer caps) at the analysed budget.
The engine also has N:M and structured granularities (FFN neurons, heads, blocks), but no measurement yet
shows which analysis figures should switch the recipe to them (BENCHMARKS.md, "Redundancy analysis"), so
heads, FFN neurons, blocks and low-rank are recommended in ANALYSIS.md's text only.
"""

from __future__ import annotations

import copy

import yaml


def suggest_pruning(analysis: dict) -> tuple[dict, list[str]]:
    """``(pruning section, reasons)`` for the budget the analysis was run at."""
    budget = float(analysis["budget"])
    removable = analysis["removable_at_1pct_mass"]
    implied = analysis["global_threshold_sparsity"]
    reasons = [f"budget: final_sparsity {budget:.2f}, as in the recipe analysed (same parameter budget)"]
    pruning: dict = {"final_sparsity": round(budget, 4), "saliency": "taylor", "scope": "global"}
    hi_layer = max(implied, key=implied.get)
    lo_layer = min(implied, key=implied.get)
    reasons.append(f"one global taylor threshold at this budget would prune {hi_layer} to {implied[hi_layer]:.0%} "
                   f"and {lo_layer} to {implied[lo_layer]:.0%} (from the calibration saliency)")
    cap = min(0.98, max(budget + 0.05, round(sorted(implied.values())[int(0.9 * (len(implied) - 1))] + 0.02, 2)))
    pruning["max_layer_sparsity"] = round(cap, 2)
    reasons.append(f"max_layer_sparsity {cap:.2f}: near the 90th percentile of those per-layer figures, so no "
                   "single layer is emptied on the evidence of a few calibration batches")
    floor = min(removable.values())
    low = max(0.0, min(round(floor, 2), round(budget - 0.1, 2)))
    if low > 0:
        pruning["min_layer_sparsity"] = low
        reasons.append(f"min_layer_sparsity {low:.2f}: every layer can lose that share of its weights while "
                       "giving up at most 1% of its saliency mass")
    stability = analysis.get("saliency_stability")
    if stability:
        mean = sum(stability.values()) / len(stability)
        reasons.append(f"how sure: the two halves of the calibration batches agree on {mean:.0%} (Jaccard) of the "
                       f"lowest-{budget:.0%} weights per layer; low agreement means the caps rest on noisy scores")
    return pruning, reasons


def suggested_recipe_yaml(recipe_data: dict, analysis: dict) -> str:
    """The analysed recipe with its pruning section replaced, reasoning in comments (it validates)."""
    pruning, reasons = suggest_pruning(analysis)
    data = copy.deepcopy(recipe_data)
    old = data.get("pruning") if isinstance(data.get("pruning"), dict) else {}
    keep = {k: v for k, v in (old or {}).items() if k in ("start_step", "end_step", "update_every", "schedule")}
    data["pruning"] = {**keep, **pruning}
    header = ["# Suggested by `prune-callbacks analyze` from measurements of the dense model.", "#"]
    header += [f"# - {r}" for r in reasons]
    header += ["# Structured options (heads, FFN neurons, blocks, low-rank) are discussed in ANALYSIS.md.", ""]
    return "\n".join(header) + "\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
