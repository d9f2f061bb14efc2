"""What ``finetune`` leaves behind besides the model: report.json, REPORT.md and sparsity.png."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any, Optional

import torch

from prune_callbacks.core.report import model_sparsity
from prune_callbacks.recipe.schema import Recipe
from prune_callbacks.recipe.slimming import SPARSE_SKIPPED

REPORT_JSON, REPORT_MD, PLOT_PNG = "report.json", "REPORT.md", "sparsity.png"


def _strip(metrics: dict, prefix: str, task: str) -> dict:
    """``{"eval_accuracy": ..}`` -> ``{"accuracy": ..}`` (numbers only), with perplexity for causal-lm."""
    from prune_callbacks.assets import perplexity

    out = {k[len(prefix) + 1:]: float(v) for k, v in metrics.items()
           if k.startswith(prefix + "_") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    if task == "causal-lm" and "loss" in out and "perplexity" not in out:
        out["perplexity"] = perplexity(out["loss"])
    return out


def _history(log_history: list[dict], task: str) -> tuple[Optional[dict], list[dict]]:
    """(dense metrics logged at train begin, evaluations during training)."""
    dense, evals = None, []
    for entry in log_history:
        if any(k.startswith("dense_") for k in entry):
            dense = _strip(entry, "dense", task)
        elif "eval_loss" in entry:
            evals.append({"step": int(entry.get("step", 0)), **_strip(entry, "eval", task)})
    return dense, evals


def _target_sparsity(pruner) -> dict:
    """Exact zeros in the pruned layers' weights (what was saved), per target and in total: the
    finalized pruner's own report, which counts them from the weights."""
    report = pruner.report() if pruner is not None else {"per_target": {}, "prunable_params": 0, "pruned_params": 0}
    per_target = {n: {"numel": r["numel"], "nonzero": r["nonzero"], "sparsity": r["sparsity"]}
                  for n, r in report["per_target"].items()}
    # report.json's name for the pruner's global_sparsity (the same figure, not a second count)
    return {"per_target": per_target, "target_params": report["prunable_params"],
            "target_params_pruned": report["pruned_params"], "target_sparsity": report.get("global_sparsity", 0.0)}


def _final_sparsity(recipe: Recipe) -> float:
    """The configured final sparsity; for several configs the largest (each config's own is in the recipe copy)."""
    return max(p.final_sparsity for p in recipe.pruning_configs)


def _versions() -> dict:
    import transformers

    from prune_callbacks import __version__

    return {"prune_callbacks": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def weight_bytes(directory: Path) -> int:
    """Bytes of the standard weights files in ``directory`` (single or sharded)."""
    files = list(directory.glob("*.safetensors")) or list(directory.glob("pytorch_model*.bin"))
    return sum(f.stat().st_size for f in files)


def measure_sparsity(model, pruner) -> tuple[dict, dict]:
    """``(model_sparsity(model), the pruner's per-target zeros)``: what the report's sparsity figures are built from."""
    return model_sparsity(model), _target_sparsity(pruner)


def build_report(*, recipe: Recipe, recipe_path: Optional[str], out: Path, model, pruner, log_history: list,
                 global_step: int, train_output, pruned_metrics: dict, recorder, data, sparse_info,
                 timing: dict, written: Optional[Path] = None, measured: Optional[tuple] = None,
                 exported: Optional[dict] = None) -> dict[str, Any]:
    """``out``: where the run's artefacts end up; ``written``: where they are now (the staging folder).
    ``measured``: `measure_sparsity` taken earlier (before the export); ``exported``: ``output.slim``'s
    ``{export name: summary}`` (:mod:`.slimming`; ``slim``, ``low_rank``), each written under its name
    with ``saved_params``, which also means no sparse checkpoint."""
    task = recipe.task
    written = out if written is None else written
    dense, evals = _history(log_history, task)
    whole, targets = measured if measured is not None else measure_sparsity(model, pruner)
    whole = dict(whole)
    per_tensor = whole.pop("per_tensor")
    return {
        "recipe": str(recipe_path) if recipe_path else None,
        "description": recipe.description,
        "output_dir": str(out),
        "task": task,
        "model": f"{recipe.model.source}:{recipe.model.name}",
        "data": f"{recipe.data.source}:{recipe.data.name or ','.join(recipe.data.files or {})}",
        "metric": recipe.metrics[0],
        "metrics": recipe.metrics,
        "dense_metrics": dense,
        "pruned_metrics": _strip(pruned_metrics, "eval", task),
        "evaluations": evals,
        "sparsity": {
            "final_sparsity": _final_sparsity(recipe),
            **({"final_sparsity_per_config": [p.final_sparsity for p in recipe.pruning_configs]}
               if isinstance(recipe.pruning, list) else {}),
            "targets": len(targets["per_target"]),
            **{k: v for k, v in targets.items() if k != "per_target"},
            "model_sparsity": whole["sparsity"],
            "matrix_sparsity": whole["matrix_sparsity"],
            "params": whole["params"],
            "nonzero_params": whole["nonzero_params"],
        },
        "per_target": targets["per_target"],
        "per_tensor": per_tensor,
        "history": {"step": recorder.steps, "target": recorder.target, "achieved": recorder.achieved},
        "training": {
            "global_step": int(global_step),
            "train_loss": float(train_output.training_loss),
            "train_examples": len(data.train),
            "eval_examples": len(data.eval),
            "raw_rows": data.raw_sizes,
            "pruner_step": pruner.step if pruner is not None else None,
            "mask_updates": pruner.mask_updates if pruner is not None else None,
            "recovery": [c.report() for c in pruner.recovery] if pruner is not None else [],
        },
        "sizes": {
            "model_bytes": weight_bytes(written),
            "sparse_bytes": sparse_info.file_bytes if sparse_info is not None else None,
            "sparse_dir": str(out / "sparse") if sparse_info is not None else None,
            **({"sparse_skipped": SPARSE_SKIPPED} if exported is not None else {}),
        },
        **{name: {**summary, "saved_params": sum(p.numel() for p in model.parameters())}
           for name, summary in (exported or {}).items()},
        "timing": dict(timing),
        "versions": _versions(),
    }


def write_json(report: dict, out: Path) -> Path:
    path = out / REPORT_JSON
    path.write_text(json.dumps(report, indent=2, allow_nan=True) + "\n", encoding="utf-8")
    return path


def write_all(report: dict, out: Path, plot: bool = True) -> None:
    """report.json, sparsity.png (if ``plot``) and REPORT.md."""
    from prune_callbacks.recipe.markdown import render_markdown

    write_json(report, out)
    if plot:
        from prune_callbacks.recipe.plots import plot_report

        plot_report(report, out / PLOT_PNG)
    (out / REPORT_MD).write_text(render_markdown(report, plot_name=PLOT_PNG if plot else None), encoding="utf-8")
