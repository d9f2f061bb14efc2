"""One-line description of a recipe, and the short end-of-run summary."""

from __future__ import annotations

from typing import Mapping, Optional

from prune_callbacks.recipe.schema import Recipe
from prune_callbacks.recipe.tables import human_bytes, human_count


def describe(recipe: Recipe) -> str:
    d, t = recipe.data, recipe.training
    caps = ", ".join(x for x in (f"train<={d.max_train_samples}" if d.max_train_samples else "",
                                 f"eval<={d.max_eval_samples}" if d.max_eval_samples else "",
                                 f"max_length {d.max_length}") if x)
    steps = f"max_steps {t['max_steps']}" if t.get("max_steps", -1) > 0 else f"{t.get('num_train_epochs', 3.0)} epochs"
    return (f"{recipe.task}; model {recipe.model.source}:{recipe.model.name}; "
            f"data {d.source}:{d.name or ','.join(d.files or {})} ({caps}); "
            f"pruning {' + '.join(f'{p.saliency}/{p.schedule} to {p.final_sparsity:.0%} ({_shape(p)})' for p in recipe.pruning_configs)}; "
            f"{steps}; "
            + ("slim; " if recipe.output.slim else "")
            + f"metric {recipe.metrics[0]}; output {recipe.output.dir}")


def _shape(config) -> str:
    """``global`` / ``per_layer`` for unstructured weights, else the granularity (``2:4``, ``ffn_neurons``, ...);
    with ``recovery_lr_scale`` also the rate's multiple after the cut."""
    shape = config.scope if config.granularity == "unstructured" else config.granularity
    return shape + (f"; rate x{config.recovery_lr_scale:g} after the cut" if config.recovery_lr_scale != 1.0 else "")


def format_metric(name: str, value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if name == "perplexity" else f"{value:.4f}"


def dense_step(report: Mapping) -> Optional[int]:
    """Optimizer step the dense baseline was measured at (0: before fine-tuning); None if not measured.
    Reports written before ``dense_step`` was logged count as step 0."""
    dense = report.get("dense_metrics")
    return None if not dense else int(dense.get("step", 0))


def dense_label(report: Mapping) -> str:
    """When the dense metrics were measured: ``step 16, before pruning`` / ``step 0, before fine-tuning``."""
    step = dense_step(report)
    if step is None:
        return "not measured"
    return f"step {step}, before pruning" if step > 0 else "step 0, before fine-tuning"


def run_summary(report: Mapping) -> str:
    """The short block printed when ``finetune`` finishes."""
    metric = report["metric"]
    dense = report["dense_metrics"].get(metric) if report.get("dense_metrics") else None
    pruned = report["pruned_metrics"].get(metric)
    s = report["sparsity"]
    sizes = report["sizes"]
    lines = [
        f"done in {report['timing']['total_s']:.0f} s -> {report['output_dir']}",
        f"  {metric:<12} dense {format_metric(metric, dense)} ({dense_label(report)})  ->  "
        f"pruned {format_metric(metric, pruned)} (step {report['training']['global_step']}, after pruning)",
        f"  sparsity     {s['target_sparsity']:.1%} of pruned layers ({s['target_params_pruned']:,} weights zero); "
        f"{s['model_sparsity']:.1%} of all parameters",
        f"  nonzero      {human_count(s['nonzero_params'])} of {human_count(s['params'])} parameters",
        f"  on disk      {human_bytes(sizes['model_bytes'])} standard (model.safetensors)"
        + (f", {human_bytes(sizes['sparse_bytes'])} sparse (sparse/)" if sizes.get("sparse_bytes") else ""),
    ]
    if report.get("slim"):
        lines.append(f"  slim         {slim_line(report['slim'])}")
    for recovery in report["training"].get("recovery") or []:
        lines.append(f"  rate         {recovery_line(recovery)}")
    for guard in report.get("accuracy_guard") or []:
        final = guard.get("final") or {}
        if final:
            lines.append(f"  guard        ended at {final['sparsity']:.1%} sparsity, {guard['metric']} {final['metric']:.4f} "
                         f"(dense {guard['baseline']:.4f}; {'within' if final['met'] else 'NOT within'} the allowed drop)")
    return "\n".join(lines)


def slim_line(slim: Mapping) -> str:
    """``22.7M -> 19.2M parameters (intermediate_size 1536 -> 768)``: what slimming changed."""
    changes = ", ".join(f"{k} {v[0]} -> {v[1]}" for k, v in slim["config"].items() if not isinstance(v[0], (list, tuple)))
    return (f"{human_count(slim['params_before'])} -> {human_count(slim['params_after'])} parameters"
            + (f" ({changes})" if changes else ""))


def recovery_line(recovery: Mapping) -> str:
    """``x2.25 from step 51, ramped in over 10 steps (recovery_lr_scale)``: one `RecoveryRate.report`."""
    return (f"x{recovery['recovery_lr_scale']:g} from step {recovery['after_step'] + 1}, ramped in over "
            f"{recovery['ramp_steps']} step{'s' if recovery['ramp_steps'] != 1 else ''} (recovery_lr_scale)")
