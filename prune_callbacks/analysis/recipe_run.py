"""``prune-callbacks analyze RECIPE.yaml --output-dir DIR``: model and data from the recipe, a calibration
slice of the training data, a held-out slice of the evaluation data, then analyze() and every file.

For sequence classification the head of a freshly loaded model is random, so every metric would be
at chance level: the head alone (nothing else) is first fitted on the calibration slice's features,
pooled the way the encoder was trained (:mod:`.probe`); ANALYSIS.md says so. ``--no-fit-head`` turns
it off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from prune_callbacks.analysis.errors import AnalysisError
from prune_callbacks.analysis.probe import MeanPooled, fit_head, trained_pooling


def _batches(dataset, collator, rows: int, batch_size: int) -> list[dict]:
    n = min(rows, len(dataset))
    if n == 0:
        raise AnalysisError("the data slice has zero rows")
    out = []
    for start in range(0, n, batch_size):
        items = [dataset[i] for i in range(start, min(n, start + batch_size))]
        out.append(dict(collator(items)))
    return out


def run_analysis(recipe_path: str, output_dir: str, sets: Sequence[str] = (), calibration_rows: int = 256,
                 eval_rows: int = 200, batch_size: int = 32, do_fit_head: bool = True, goal: str = "auto",
                 latency=None) -> Path:
    """``latency``: `LatencyOptions` for the latency probe (:func:`.latency.latency_options` builds them from the
    command line; ``--goal speed`` runs it by default), or None."""
    from transformers import set_seed

    from prune_callbacks.recipe.data import load_data, prepare
    from prune_callbacks.recipe.loading import apply_overrides, load_recipe, parse_set
    from prune_callbacks.recipe.yaml_reading import read_yaml
    from prune_callbacks.recipe.models import load_model
    from prune_callbacks.recipe.models import quiet_transformers
    from prune_callbacks.analysis.plots import write_plots
    from prune_callbacks.analysis.report import write_json, write_markdown
    from prune_callbacks.analysis.run import analyze
    from prune_callbacks.analysis.suggest import GOALS, suggested_recipe_yaml

    if goal not in GOALS:
        raise AnalysisError(f"goal={goal!r} is unknown; allowed: {', '.join(GOALS)}")
    if latency is not None and goal != "speed":
        raise AnalysisError(f"the latency probe does not apply with goal={goal!r}: it runs with goal 'speed' only")
    recipe = load_recipe(recipe_path, sets)
    seed = int(recipe.training.get("seed", 42))
    set_seed(seed)
    if calibration_rows < 1 or eval_rows < 1:
        raise AnalysisError(f"calibration_rows={calibration_rows}, eval_rows={eval_rows}: both must be >= 1")
    with quiet_transformers():
        train_raw, eval_raw, label_names, label_map = load_data(recipe, seed)
        model, tokenizer = load_model(recipe, label_names)
    data = prepare(recipe, tokenizer, train_raw, eval_raw, label_map)
    calib = _batches(data.train, data.collator, calibration_rows, batch_size)
    held = _batches(data.eval, data.collator, eval_rows, batch_size)
    fitted, probe = False, None
    if recipe.task == "sequence-classification" and do_fit_head:
        pooling, why = trained_pooling(model)
        if pooling == "mean":
            model = MeanPooled(model)
        print(f"[analyze] fitting the classification head on {pooling}-pooled calibration features ({why})", flush=True)
        fitted = fit_head(model, calib)
        probe = {"pooling": pooling, "why": why}
    config = recipe.pruning_configs[0]
    metric = recipe.metrics[0]
    result = analyze(model, calib, held, metric=metric, include=config.include, exclude=config.exclude,
                     budget=config.final_sparsity, latency=latency)
    result["goal"] = goal
    result["head_fitted"] = fitted
    result["probe"] = probe
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(result, out / "analysis.json")
    write_markdown(result, out / "ANALYSIS.md")
    if fitted:
        with open(out / "ANALYSIS.md", "a", encoding="utf-8") as f:
            f.write("\nNote: the classification head was random after loading; only the head was fitted (LBFGS "
                    f"logistic regression on {probe['pooling']}-pooled calibration features: {probe['why']}) before "
                    "measuring, so the metrics mean something. Saliency and the metrics are measured through that "
                    "pooling.\n")
    write_plots(result, out)
    lat = result.get("latency") or {}
    if lat.get("target_speedup") is not None and lat.get("chosen") is None:
        (out / "suggested.yaml").unlink(missing_ok=True)  # not a stale suggestion from an earlier run
        raise AnalysisError(f"{lat['why']}. analysis.json and ANALYSIS.md are written to {out}; no suggested.yaml")
    raw, lines = read_yaml(recipe_path)
    apply_overrides(raw, [parse_set(item) for item in sets], lines)  # the recipe as analysed, --set included
    (out / "suggested.yaml").write_text(suggested_recipe_yaml(raw, result), encoding="utf-8")
    load_recipe(out / "suggested.yaml")  # the suggestion must validate; RecipeError otherwise
    return out
