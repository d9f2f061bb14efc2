"""From the measurements to a recipe: the strategy, its budgets, and the reasoning as comments.

**Strategy** (:func:`choose_strategy`), from the one-shot probe of every strategy at the analysed
parameter budget (:mod:`.strategies`) and the user's ``goal``:

* a *pool*: ``size``: every strategy; ``speed``: the *structured* ones (FFN neurons, heads, blocks, and
  their combinations: a smaller dense model; unstructured only if none can remove the budget); ``auto``
  (default): the structured ones when the best of them is within the metric's noise of the best of all
  (speed for no measurable loss), else every strategy;
* from the pool, the **finest-grained** strategy whose one-shot damage is within noise of the pool's
  least damaged one (`COARSENESS`: unstructured, N:M, width units, heads + FFN, blocks + FFN, blocks).
  One-shot damage cannot separate strategies within its noise, and fine-tuning recovers more of a finer
  strategy's damage: on MiniLM/RT at a third of the weights the probe put 1 block + 30% FFN (0.650) above
  FFN 50% (0.635), both within noise, but after fine-tuning FFN 50% was 2.75 points better (76.75 vs 74.0)
  and 2 blocks 10.5 points worse; this rule was adopted after that measurement (BENCHMARKS.md).

When every candidate is at chance level one-shot, the probe cannot rank them: ``auto``/``size`` keep
unstructured (the most flexible), ``speed`` the finest-grained structured one, and the comments say so.

**Low rank** is in the pool only where the spectra show it pays (`low_rank_pays`): at least half of
the targeted weights sit in matrices whose rank holding 95% of their energy is at most the rank that
removes the budget from them, ``(1 - budget) * mn/(m+n)`` (effective rank well below break-even);
otherwise it is dropped with that reason. Its suggested config trains with the Fisher-weighted ranks
(the probe measured plain SVD), and the saved model holds rank-``r`` weights (factorise them with
:mod:`prune_callbacks.export.low_rank`).

**Latency** (``--goal speed``, :mod:`.latency`): the probe times slimmed depth + width plans against the
dense model; each chosen structured strategy's measured speed-up is quoted. With a target speed-up the
suggestion is instead the plan measured at or above the target with the least predicted quality loss
(:func:`latency_plan`), whatever its parameter count; none at the target raises `AnalysisError`.

**Budgets**: unstructured gets a global Taylor threshold with per-layer caps from the calibration
saliency (:func:`unstructured_budgets`); structured strategies get the unit fractions that remove the
budget, and ``output.slim: true``.

**Blocks** (:func:`cut_blocks_at_once`): a suggestion that removes whole blocks removes them one-shot in the
middle of the recipe's pruning window and folds them into the kept block before them (``merge: true``), the
way the measured 3x plans were trained, unless the analysis found that the model's blocks cannot fold.
"""

from __future__ import annotations

import copy
from typing import Optional

import yaml

from prune_callbacks.core.config import PruningConfig
from prune_callbacks.analysis.errors import AnalysisError
from prune_callbacks.analysis.metrics import noise
from prune_callbacks.analysis.strategies import STRUCTURED, is_structured
from prune_callbacks.core.resolution import WINDOW_FIELDS
from prune_callbacks.methods.granularity.low_rank import LATE_CUT
from prune_callbacks.methods.schedule import OneShot

GOALS = ("auto", "size", "speed")
_FIELDS = PruningConfig.model_fields
_KEEP = ("start_step", "end_step", "update_every", "schedule", "include", "exclude")


def unstructured_budgets(analysis: dict) -> tuple[dict, list[str]]:
    """``(pruning section, reasons)``: global taylor at the budget, caps from the saliency figures."""
    budget = float(analysis["budget"])
    removable = analysis["removable_at_1pct_mass"]
    implied = analysis["global_threshold_sparsity"]
    reasons = []
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


def _damage(analysis: dict, row: dict) -> float:
    sign = 1.0 if analysis["higher_is_better"] else -1.0
    return sign * (analysis["baseline"] - row["metric"])


#: coarser last: fine-tuning recovers more of a finer strategy's damage (BENCHMARKS.md, "Redundancy analysis")
COARSENESS = {"unstructured": 0, "N:M": 1, "ffn_neurons": 2, "attention_heads": 2, "low_rank": 2,
              "attention_heads+ffn_neurons": 3, "blocks+ffn_neurons": 4, "blocks": 5}
PAYS_SHARE = 0.5  # low rank is proposed when at least this share of the targeted weights is that low-rank


def low_rank_pays(analysis: dict) -> tuple[bool, str]:
    """``(pays, reason)``: whether the spectra show a factorisation removing the budget keeps 95% of the energy
    of at least `PAYS_SHARE` of the targeted weights (see the module docstring)."""
    budget = float(analysis["budget"])
    spectra = analysis.get("spectra") or {}
    total = sum(s["shape"][0] * s["shape"][1] for s in spectra.values())
    low = {n: s for n, s in spectra.items() if s["rank_95"] and s["rank_95"] <= (1 - budget) * s["break_even_rank"]}
    share = sum(s["shape"][0] * s["shape"][1] for s in low.values()) / total if total else 0.0
    reason = (f"spectra: {len(low)} of {len(spectra)} matrices ({share:.0%} of the targeted weights) hold 95% of "
              f"their energy at or below {1 - budget:.0%} of their break-even rank mn/(m+n), the rank that removes "
              f"{budget:.0%} of their parameters")
    return share >= PAYS_SHARE, reason


def _finest_near_best(analysis: dict, pool: list[dict], tol: float) -> tuple[dict, dict, list[dict]]:
    """``(chosen, best, near)``: the finest-grained row within ``tol`` of the pool's least damaged one."""
    order = {id(r): i for i, r in enumerate(pool)}
    best = min(pool, key=lambda r: (_damage(analysis, r), order[id(r)]))
    near = [r for r in pool if _damage(analysis, r) <= _damage(analysis, best) + tol]
    chosen = min(near, key=lambda r: (COARSENESS.get(r["kind"], 9), _damage(analysis, r), order[id(r)]))
    return chosen, best, near


def choose_strategy(analysis: dict, goal: str = "auto") -> tuple[Optional[dict], list[str]]:
    """``(chosen probe row or None for unstructured-by-default, reasons)``; see the module docstring."""
    if goal not in GOALS:
        raise ValueError(f"goal={goal!r} is unknown; allowed: {', '.join(GOALS)}")
    probed = analysis.get("strategies") or []
    rows = [r for r in probed if r.get("applicable")]
    if not rows or "baseline" not in analysis:
        why = ("no strategy could be probed (" + "; ".join(f"{r['name']}: {r['why']}" for r in probed) + ")"
               if probed else "no strategy probe (no held-out data)")
        return None, [f"{why}: unstructured, the engine's default"]
    low = [r for r in rows if r["kind"] == "low_rank"]
    if low:
        pays, why = low_rank_pays(analysis)
        if not pays:
            rows = [r for r in rows if r["kind"] != "low_rank"]
            note = f"low_rank left out: {why} (under {PAYS_SHARE:.0%}: a factorisation would cut into the energy)"
        else:
            note = f"low_rank considered: {why}"
    metric, base = analysis["metric"], analysis["baseline"]
    tol = noise(metric, base, analysis.get("eval_rows", 0))
    listing = ", ".join(f"{r['name']} {r['metric']:.4g}" for r in rows)
    reasons = [f"one-shot probe, every strategy removing {analysis['budget']:.0%} of the targeted weights, "
               f"{metric} on the held-out slice (dense {base:.4g}, noise ±{tol:.3g}): {listing}"]
    if low:
        reasons.append(note)
    structured = [r for r in rows if is_structured(r["kind"])]
    chance = analysis.get("chance")
    if chance is not None and all(r["metric"] <= chance + tol for r in rows):
        blind = (f"every strategy is at chance level ({chance:.3f}) one-shot at this budget: the probe cannot "
                 "rank them (fine-tuning decides)")
        if goal == "speed" and structured:
            chosen = min(structured, key=lambda r: COARSENESS.get(r["kind"], 9))
            reasons.append(f"{blind}; goal speed: {chosen['name']}, the finest-grained structured one")
            return chosen, reasons
        reasons.append(f"{blind}; goal {goal}: unstructured, the most flexible strategy")
        return _named(rows, "unstructured"), reasons
    if goal == "speed" and not structured:
        reasons.append("goal speed, but no structured strategy can remove this budget on this model: unstructured")
        return _named(rows, "unstructured"), reasons
    _, best, _ = _finest_near_best(analysis, rows, tol)
    if goal == "speed":
        pool, why = structured, "goal speed: among the structured strategies"
    elif goal == "auto" and structured and min(_damage(analysis, r) for r in structured) <= _damage(analysis, best) + tol:
        pool, why = structured, (f"goal auto: a structured strategy is within noise of the best of all ({best['name']}) "
                                 "and gives a smaller, faster dense model, so among the structured ones")
    else:
        pool, why = rows, f"goal {goal}: among all strategies"
        if goal == "auto" and structured:
            why += " (every structured one is beyond noise of the best)"
    chosen, pool_best, near = _finest_near_best(analysis, pool, tol)
    others = [r["name"] for r in near if r is not chosen]
    reasons.append(f"{why}, {chosen['name']}: the finest-grained within noise of the least damaged ({pool_best['name']})"
                   + (f"; also within noise: {', '.join(others)} (one-shot cannot separate them; fine-tuning recovers "
                      "more of a finer strategy's damage)" if others else ""))
    return chosen, reasons


def _named(rows, kind):
    return next((r for r in rows if r["kind"] == kind), None)


def latency_plan(analysis: dict) -> tuple[Optional[dict], list[str]]:
    """``(row, reasons)``: the plan the latency probe chose for its target speed-up (:mod:`.latency`), or
    ``(None, [])`` without a target. No plan at the target raises `AnalysisError` with the probe's reason."""
    lat = analysis.get("latency") or {}
    if lat.get("target_speedup") is None:
        return None, []
    if lat.get("chosen") is None:
        raise AnalysisError(lat.get("why") or "the latency probe chose no plan")
    row = next(r for r in lat["rows"] if r["name"] == lat["chosen"])
    reasons = [f"goal speed with a target speed-up: latency probe of {len(lat['rows'])} slimmed depth + width plans "
               f"against the dense model (batch {lat['batch']} x seq {lat['seq']}, {lat['threads']} thread(s), median "
               f"of {lat['repeats']} interleaved rounds, {lat['seconds']:.0f} s)", lat["why"],
               f"measured speed-up {row['speedup']:.2f}x at {row['params_ratio']:.0%} of the parameters; predicted "
               "quality loss = share of the blocks' calibration saliency removed (blocks by least influence "
               "1 - cos, neurons / KV groups by least saliency): it ranks plans, fine-tuning decides the accuracy"]
    if row["blocks"]:
        reasons.append(f"blocks the probe removed (least influence): {', '.join(row['blocks'])}; training re-chooses "
                       "them by saliency")
    reasons.append("the plan's parameter count replaces the analysed budget (final_sparsity) in this suggestion")
    reasons.append("output.slim: true cuts the removed units out; the result is a plain, smaller model")
    return row, reasons


def _measured_speed(analysis: dict, chosen: Optional[dict]) -> list[str]:
    """The latency probe's figure for the chosen budget strategy, where the probe timed it."""
    lat = analysis.get("latency") or {}
    row = next((r for r in lat.get("rows") or [] if chosen and sorted(map(str, r["configs"])) ==
                sorted(map(str, chosen.get("configs") or []))), None)
    if row is None:
        return []
    return [f"latency probe: {row['name']} measured {row['speedup']:.2f}x the dense model's speed (batch "
            f"{lat['batch']} x seq {lat['seq']}, {lat['threads']} thread(s)); --target-speedup chooses by speed"]


def suggest_pruning(analysis: dict) -> tuple[object, list[str]]:
    """``(pruning section: one dict or a list, reasons)`` for the analysed budget and ``analysis['goal']``."""
    budget = float(analysis["budget"])
    row, why = latency_plan(analysis)
    if row is not None:
        configs = [dict(c) for c in row["configs"]]
        return (configs[0] if len(configs) == 1 else configs), why
    reasons = [f"budget: {budget:.2f} of the targeted weights, as the analysed recipe's final_sparsity "
               "(same parameter budget)"]
    chosen, why = choose_strategy(analysis, analysis.get("goal", "auto"))
    reasons += why
    if chosen is None or chosen["kind"] == "unstructured":
        pruning, more = unstructured_budgets(analysis)
        return pruning, reasons + more
    configs = [dict(c) for c in chosen["configs"]]
    if chosen["kind"] == "low_rank":
        configs = [{**{k: v for k, v in c.items() if k != "granularity_settings"}, **copy.deepcopy(LATE_CUT)} for c in configs]
        reasons.append("low_rank: training allocates the ranks by Fisher-weighted SVD (the probe measured plain SVD "
                       "ranks, a pessimistic proxy); the saved weights have those ranks: factorise them with "
                       "prune_callbacks.export.low_rank (export_pruned, save_low_rank)")
        reasons.append("low_rank cut late (schedule oneshot at 0.8 of the run, allocation relative): the ranks come "
                       "from a model that has learnt the task and the last 20% fine-tunes the factorised model "
                       "(docs/low-rank.md)")
        return configs[0], reasons
    if chosen["kind"] == "N:M":
        reasons.append(f"{configs[0]['granularity']}: N kept in every M consecutive weights; final sparsity follows")
    else:
        for c in configs:
            unit = "blocks removed" if c["granularity"] == "blocks" else f"{c['granularity']} removed in every block"
            reasons.append(f"{c['granularity']} final_sparsity {c['final_sparsity']}: the fraction of {unit}")
        kept = chosen.get("kept_per_block") or {}
        if "blocks" in kept:
            gone = [b for b, k in kept["blocks"].items() if k == 0]
            reasons.append(f"blocks the probe removed (lowest saliency): {', '.join(gone)}; training re-chooses them")
        reasons.append("output.slim: true cuts the removed units out; the result is a plain, smaller model")
        reasons += _measured_speed(analysis, chosen)
    return (configs[0] if len(configs) == 1 else configs), reasons


def blocks_fate(analysis: dict) -> tuple[bool, str]:
    """Whether the analysed model's removed blocks fold into the kept block before them
    (``analysis['blocks_fold_refusal']`` None), and the words for it (`cut_blocks_at_once`, ANALYSIS.md)."""
    refusal = analysis.get("blocks_fold_refusal", "this analysis did not check whether the blocks fold")
    if refusal is None:
        return True, "folded into the kept block before them (merge: true)"
    return False, f"dropped (no merge: {refusal})"


def cut_blocks_at_once(configs: list[dict], analysis: dict) -> list[str]:
    """Make every ``blocks`` config among ``configs`` (with the analysed recipe's window) remove its blocks at once in
    the middle of that window, folded into the kept block before them where the model's blocks fold
    (``analysis['blocks_fold_refusal']`` None); returns the reasons, which quote the measurements behind it."""
    reasons = []
    for c in configs:
        if c.get("granularity") != "blocks":
            continue
        start = c.get("start_step", _FIELDS["start_step"].default)
        end = c.get("end_step", _FIELDS["end_step"].default)
        at = start if type(start) is not type(end) else (start + end) // 2 if isinstance(start, int) else \
            round((start + end) / 2, 4)
        for field in WINDOW_FIELDS - OneShot.reads:
            c.pop(field, None)  # a one-shot cut has no window, no grid and no start value (PruningConfig refuses them)
        c.update(schedule="oneshot", start_step=at)
        folds, fate = blocks_fate(analysis)
        if folds:
            c["merge"] = True
        reasons.append(
            f"blocks removed at once at {at} (the middle of the pruning window), {fate}: on MiniLM / RT a cut a "
            "third into the run, folded, kept +1.15 +- 0.44 points more than the gradual drop (3x plan, three "
            "seeds); the fold alone +1.8 +- 0.4 at 2 of 6 blocks (BENCHMARKS.md, issue 28). "
            "Also worth trying there: merge.select: fold (better at 3 blocks on an encoder, worse on SmolLM2) and "
            "recovery_lr_scale 2.25 on this config (+0.5 +- 0.3 points over ten seeds: not shown)")
    return reasons


def suggested_recipe_yaml(recipe_data: dict, analysis: dict) -> str:
    """The analysed recipe with its pruning section replaced, reasoning in comments (it validates)."""
    pruning, reasons = suggest_pruning(analysis)
    data = copy.deepcopy(recipe_data)
    old = data.get("pruning") if isinstance(data.get("pruning"), dict) else {}
    keep = {k: v for k, v in (old or {}).items() if k in _KEEP}
    if isinstance(pruning, list):
        data["pruning"] = [{**keep, **c} for c in pruning]
    else:
        data["pruning"] = {**keep, **pruning}
    listed = data["pruning"] if isinstance(data["pruning"], list) else [data["pruning"]]
    reasons = reasons + cut_blocks_at_once(listed, analysis)
    if any(c.get("granularity") == "low_rank" for c in listed):
        output = dict(data.get("output") or {})
        output.pop("save_sparse", None)  # low-rank weights are dense: no sparse/ folder
        data["output"] = output
    if any(is_structured_config(c) for c in listed):
        output = dict(data.get("output") or {})
        output.pop("save_sparse", None)  # a slim model is dense: no sparse/ folder
        output["slim"] = True
        data["output"] = output
    chosen = ("; ".join(", ".join(f"{k} {v}" for k, v in c.items()) for c in pruning)
              if isinstance(pruning, list) else ", ".join(f"{k} {v}" for k, v in pruning.items()))
    if isinstance(data.get("description"), str):
        data["description"] = f"Suggested by prune-callbacks analyze ({chosen}) for: {data['description']}"
    header = ["# Suggested by `prune-callbacks analyze` from measurements of the dense model.", "#"]
    header += [f"# - {r}" for r in reasons]
    header += ["# ANALYSIS.md has the figures behind each line.", ""]
    return "\n".join(header) + "\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def is_structured_config(config: dict) -> bool:
    return config.get("granularity") in STRUCTURED
