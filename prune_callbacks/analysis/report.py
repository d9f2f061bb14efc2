"""analysis.json and ANALYSIS.md: the figures, and what they say (what is redundant, how sure, what to do)."""

from __future__ import annotations

import json
from pathlib import Path

from prune_callbacks.analysis.errors import AnalysisError
from prune_callbacks.analysis.metrics import noise, standard_error
from prune_callbacks.analysis.suggest import blocks_fate, suggest_pruning


def write_json(a: dict, path: Path) -> None:
    path.write_text(json.dumps(a, indent=1), encoding="utf-8")


def markdown(a: dict) -> str:
    lines = ["# Redundancy analysis", ""]
    metric, budget = a["metric"], a["budget"]
    lines += [f"Calibration: {a['calibration_rows']} rows in {a['calibration_batches']} batches; "
              f"{len(a['targets'])} targeted weight matrices; budget quoted at {budget:.0%} sparsity; "
              f"{a['seconds']:.0f} s.", ""]
    if "baseline" in a:
        extra = (f" (± {standard_error(a['baseline'], a['eval_rows']):.3f} standard error)" if metric in ("accuracy", "f1") else "")
        lines += [f"**Baseline** {metric} on {a['eval_rows']} held-out rows: {a['baseline']:.4f}{extra}.", ""]
    # blocks
    lines += ["## Blocks", "", f"| block | 1 - cos(in, out) | {metric} skipped |", "| --- | --- | --- |"]
    for b in a["blocks"]:
        lines.append(f"| {b['name']} | {b['influence']:.4f} | {b.get('metric_skipped', float('nan')):.4f} |")
    cands = []
    if "baseline" in a and any("metric_skipped" in b for b in a["blocks"]):
        tol = noise(metric, a["baseline"], a["eval_rows"])
        sign = 1 if a["higher_is_better"] else -1
        cands = [b["name"] for b in a["blocks"] if sign * (a["baseline"] - b["metric_skipped"]) <= tol]
        if "chance" in a and a["baseline"] - a["chance"] <= tol:
            cands = []
            lines += ["", f"The baseline ({a['baseline']:.3f}) is within noise of the majority-class share "
                          f"({a['chance']:.3f}): the model does not solve the task yet, so the skipped-block metrics "
                          "say nothing. Fine-tune first (or analyse a fine-tuned checkpoint) to judge blocks by the metric; "
                          "the 1 - cos figures above still hold."]
        else:
            text = (f"Blocks that, each skipped on its own, change {metric} by no more than the noise ({tol:.3f}): "
                    f"{', '.join(cands)}. This is one block at a time, not the blocks together; removing them is "
                    "block pruning (drop them, then fine-tune)." if cands else
                    "No block can be skipped without a clear metric loss.")
            if cands and len(cands) == len(a["blocks"]):
                text += (" Every block passes: the held-out slice is too small to tell the blocks apart by the metric "
                         "(a larger --eval-rows narrows the noise); rank them by 1 - cos instead.")
            lines += ["", text]
    # saliency
    lines += ["", "## Saliency mass (|theta * grad|)", "", "Share of each layer kind's saliency held by its lowest x% "
              "of weights:", "", "| layer kind | 50% | 80% | 90% | 95% |", "| --- | --- | --- | --- | --- |"]
    for kind, curve in a["saliency_mass"]["per_kind"].items():
        lines.append(f"| {kind} | " + " | ".join(f"{curve.get(x, float('nan')):.2%}" for x in (0.5, 0.8, 0.9, 0.95)) + " |")
    stab = a.get("saliency_stability")
    if stab:
        mean = sum(stab.values()) / len(stab)
        lines += ["", f"How sure: the lowest-{budget:.0%} sets from two halves of the calibration batches overlap "
                      f"{mean:.0%} (Jaccard, mean over layers; min {min(stab.values()):.0%})."]
    # spectra
    lines += ["", "## Spectra", "", "| weight | shape | eff. rank | stable rank | r90 | r95 | r99 | break-even |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n, s in a["spectra"].items():
        lines.append(f"| {n} | {s['shape'][0]}x{s['shape'][1]} | {s['effective_rank']:.0f} | {s['stable_rank']:.1f} | "
                     f"{s['rank_90']} | {s['rank_95']} | {s['rank_99']} | {s['break_even_rank']:.0f} |")
    lr = a["low_rank_candidates"]
    lines += ["", (f"Low-rank candidates (95% of the energy below the break-even rank): {', '.join(lr)}."
                   if lr else "No matrix holds 95% of its energy below the break-even rank: a low-rank factorisation "
                              "would not save parameters without losing energy.")]
    # units
    lines += ["", "## Units", ""]
    hi = a["head_importance"]
    if hi:
        flat = sorted(((v, f"{blk}.head{h}") for blk, vals in hi.items() for h, v in enumerate(vals)))
        total = sum(v for v, _ in flat) or 1.0
        low = flat[: max(1, len(flat) // 4)]
        lines.append(f"Least important quarter of the heads ({len(low)} of {len(flat)}) hold "
                     f"{sum(v for v, _ in low) / total:.1%} of the heads' saliency: {', '.join(n for _, n in low[:8])}"
                     f"{' ...' if len(low) > 8 else ''}.")
    for blk, row in a["neuron_importance"].items():
        m = row["mass_of_lowest"]
        lines.append(f"- FFN {blk}: lowest 50% of {row['count']} neurons hold {m['0.5']:.1%} of their saliency")
    dh = a["duplicate_heads"]
    lines += ["", (f"Near-duplicate heads (cosine of outputs >= 0.95 on {a['head_tokens']} tokens): "
                   + ", ".join(f"{p['a']} ~ {p['b']} ({p['cosine']:.3f})" for p in dh[:10])
                   if dh else f"No near-duplicate heads (cosine >= 0.95 on {a['head_tokens']} tokens).")]
    for kind, d in a["duplicate_weights"].items():
        if d["duplicate_matrices"] or d["near_duplicate_rows"]:
            lines.append(f"- {kind}: {len(d['duplicate_matrices'])} duplicate matrix pairs, "
                         f"{d['near_duplicate_rows']} near-duplicate rows ({d['near_duplicate_rows_across_layers']} "
                         "across layers)")
    # what to do
    strategies = [r for r in a.get("strategies") or []]
    if strategies:
        lines += ["", f"## Strategies at the same parameter budget ({budget:.0%} of the targeted weights, one-shot)", "",
                  "Each strategy's masks chosen once from the calibration saliency by the engine's own selection, "
                  f"applied, {metric} measured on the held-out slice, weights restored. No fine-tuning: this ranks "
                  "the strategies, it does not predict their accuracy after training.", "",
                  f"| strategy | weights removed | {metric} one-shot | what it buys |", "| --- | --- | --- | --- |"]
        for r in strategies:
            if r.get("applicable"):
                lines.append(f"| {r['name']} | {r['removed']:.1%} | {r['metric']:.4f} | {r['buys']} |")
            else:
                lines.append(f"| {r['name']} | — | not applicable | {r['why']} |")
    lines += latency_lines(a.get("latency"))
    try:
        pruning, reasons = suggest_pruning(a)
    except AnalysisError as exc:  # a target speed-up no plan reaches: the figures stand, no suggestion
        lines += ["", "## What to do", "", f"No suggested.yaml: {exc}"]
        return "\n".join(lines) + "\n"
    sections = pruning if isinstance(pruning, list) else [pruning]
    lines += ["", "## What to do", "", "suggested.yaml: " + "; ".join(
        ", ".join(f"{k}={v}" for k, v in p.items()) for p in sections), ""]
    lines += [f"- {r}" for r in reasons]
    if any(p.get("granularity") == "blocks" for p in sections):
        lines.append("- blocks: suggested.yaml removes them at once, in the middle of the analysed recipe's pruning "
                     f"window, {blocks_fate(a)[1]}; its comments give the measurements behind that")
    if cands:
        lines.append(f"- blocks {', '.join(cands)}: candidates for removal, each measured alone ("
                     "`granularity: blocks` chooses which blocks by saliency during training, not from this list)")
    if dh:
        lines.append("- duplicate heads: keep one of each pair (`granularity: attention_heads`, Llama-family only, "
                     "ranks KV groups by saliency, not by similarity; no strategy merges duplicates yet)")
    if lr:
        lines.append("- low-rank: factorise the candidates above once a low-rank strategy exists")
    return "\n".join(lines) + "\n"


def latency_lines(lat) -> list[str]:
    """The 'Latency probe' section: one row per slimmed plan, fastest first."""
    if not lat:
        return []
    target = lat.get("target_speedup")
    lines = ["", "## Latency probe (slimmed depth + width plans vs dense)", "",
             f"Each plan cut out of a copy of the model by `slim` and timed against the dense model: batch "
             f"{lat['batch']} x seq {lat['seq']} random tokens, {lat['threads']} thread(s), median of {lat['repeats']} "
             f"interleaved rounds ({lat['seconds']:.0f} s in all). Predicted loss: share of the blocks' calibration "
             "saliency the plan removes (blocks by least influence, neurons and KV groups by least saliency); it "
             "ranks plans, it does not predict accuracy after fine-tuning."
             + (f" Target speed-up: {target:g}x." if target is not None else ""), "",
             "| plan | speed-up | parameters | predicted loss | blocks removed |", "| --- | --- | --- | --- | --- |"]
    for r in sorted(lat["rows"], key=lambda r: -r["speedup"]):
        mark = " **(chosen)**" if lat.get("chosen") == r["name"] else ""
        lines.append(f"| {r['name']}{mark} | {r['speedup']:.2f}x | {r['params_ratio']:.0%} | {r['predicted_loss']:.1%} | "
                     f"{', '.join(r['blocks']) or '—'} |")
    if target is not None:
        lines += ["", lat["why"]]
    return lines


def write_markdown(a: dict, path: Path) -> None:
    path.write_text(markdown(a), encoding="utf-8")
