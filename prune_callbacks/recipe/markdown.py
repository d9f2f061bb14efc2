"""REPORT.md: the run's results in a form that reads well on GitHub or in a model card."""

from __future__ import annotations

from typing import Mapping, Optional

from prune_callbacks.recipe.guard_artifacts import guard_markdown
from prune_callbacks.recipe.summary import dense_label, dense_step, format_metric, recovery_line, slim_line
from prune_callbacks.recipe.tables import human_bytes, human_count, markdown_table


def _row(name: str, dense: Optional[Mapping], pruned: Mapping) -> str:
    d = dense.get(name) if dense else None
    p = pruned.get(name)
    delta = format_metric(name, p - d) if d is not None and p is not None else ""
    delta = delta if delta.startswith("-") or not delta else "+" + delta
    return f"| {name} | {format_metric(name, d)} | {format_metric(name, p)} | {delta} |"


def render_markdown(report: Mapping, plot_name: Optional[str] = "sparsity.png") -> str:
    s, sizes, t = report["sparsity"], report["sizes"], report["training"]
    dense, pruned = report.get("dense_metrics"), report["pruned_metrics"]
    out = report["output_dir"]
    auto = "AutoModelForCausalLM" if report["task"] == "causal-lm" else "AutoModelForSequenceClassification"
    lines = [f"# Pruning report: {report['model']} on {report['data']}", ""]
    if report.get("description"):
        lines += [report["description"], ""]
    lines += [
        f"Task `{report['task']}`; recipe `{report.get('recipe') or '-'}` (resolved copy: `recipe.resolved.yaml`).",
        "",
        "## Results",
        "",
        f"| metric | dense ({dense_label(report)}) | pruned (step {t['global_step']}) | change |",
        "|---|---:|---:|---:|",
        *[_row(name, dense, pruned) for name in report["metrics"]],
        _row("loss", dense, pruned),
        "",
    ]
    step = dense_step(report)
    if step:
        lines += [f"*Dense* is the model fine-tuned for {step} step{'s' if step > 1 else ''}, evaluated just before "
                  "the first mask update (no weight pruned yet). *Pruned* is after fine-tuning while pruning.", ""]
    elif step == 0 and report["task"] == "sequence-classification":
        lines += ["*Dense* is the starting model evaluated before fine-tuning; its classification head is "
                  "new, so it is near chance. *Pruned* is after fine-tuning while pruning.", ""]
    lines += [
        "| | |",
        "|---|---|",
        f"| sparsity of the pruned layers | {s['target_sparsity']:.1%} (target {s['final_sparsity']:.1%}, "
        f"{s['targets']} layers, {human_count(s['target_params'])} weights) |",
        f"| sparsity of all parameters | {s['model_sparsity']:.1%} |",
        f"| nonzero parameters | {human_count(s['nonzero_params'])} of {human_count(s['params'])} |",
        f"| standard checkpoint | {human_bytes(sizes['model_bytes'])} (`model.safetensors`) |",
    ]
    if report.get("slim"):
        lines.append(f"| slimmed (units cut out; the figures above are the masked model's) | {slim_line(report['slim'])} |")
    if sizes.get("sparse_bytes"):
        lines.append(f"| sparse checkpoint | {human_bytes(sizes['sparse_bytes'])} (`sparse/`, "
                     "`prune_callbacks.export.sparse_io.load_sparse`) |")
    for recovery in t.get("recovery") or []:
        lines.append(f"| learning rate after the last mask update | {recovery_line(recovery)} |")
    lines += [
        f"| optimizer steps | {t['global_step']} (mask updates: {t['mask_updates']}), "
        f"{t['train_examples']} training / {t['eval_examples']} evaluation examples |",
        f"| time | {report['timing'].get('total_s', 0):.0f} s total, {report['timing']['train_s']:.0f} s training |",
        "",
    ]
    if plot_name:
        lines += [f"![target vs achieved sparsity over steps, and per-layer sparsity]({plot_name})", ""]
    if report["evaluations"]:
        metric = report["metric"]
        lines += ["## During training", "", f"| step | {metric} | loss |", "|---:|---:|---:|"]
        for e in report["evaluations"]:
            lines.append(f"| {e['step']} | {format_metric(metric, e.get(metric))} | {format_metric('loss', e.get('loss'))} |")
        lines.append("")
    lines += guard_markdown(report)
    table = {"per_tensor": report["per_target"]}
    lines += ["## Per-layer sparsity (pruned layers)", "", markdown_table(table), "",
              "## Loading", "", "```python",
              f"from transformers import {auto}",
              f"model = {auto}.from_pretrained({out!r})  "
              + ("# a smaller ordinary model" if report.get("slim") else "# the zeros are ordinary weights"),
              ]
    if sizes.get("sparse_bytes"):
        lines += ["from prune_callbacks.export.sparse_io import load_sparse",
                  f"model = load_sparse({sizes['sparse_dir']!r})  # same weights, smaller file"]
    lines += ["```", "", "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    return "\n".join(lines)
