"""What a recipe run evaluates: ``compute_metrics`` for classification, the metric keys ``trainer.evaluate()``
returns (the one list the accuracy guard's metric is checked against before compute), and the pruned model's
final metrics."""

from __future__ import annotations

from typing import Optional

from prune_callbacks.recipe.schema import Recipe


def make_compute_metrics(recipe: Recipe, num_labels: Optional[int]):
    """``compute_metrics`` for classification (argmax of the logits); None for causal-lm (perplexity
    comes from the eval loss, so no logits are gathered)."""
    if recipe.task != "sequence-classification":
        return None
    from prune_callbacks.assets import load_metric

    modules = {name: load_metric(name) for name in recipe.metrics}

    def compute(eval_pred) -> dict:
        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        predictions = logits.argmax(-1)
        out = {}
        for name, module in modules.items():
            kwargs = {"average": "macro"} if name == "f1" and (num_labels or 2) > 2 else {}
            out.update(module.compute(predictions=predictions, references=eval_pred.label_ids, **kwargs))
        return out

    return compute


def evaluation_keys(recipe: Recipe) -> list[str]:
    """The metric keys ``trainer.evaluate()`` returns in a recipe run (besides its timing figures): the loss, and
    for classification one key per metric of ``make_compute_metrics`` (each metric module returns its own name)."""
    return ["eval_loss", *(f"eval_{name}" for name in recipe.metrics if recipe.task == "sequence-classification")]


def final_evaluation(trainer, log_history: list[dict]) -> dict:
    """Metrics of the pruned model: the evaluation Trainer ran at the last step if there was one (the
    weights are the same: finalizing only re-applies the masks), else a fresh ``evaluate()``."""
    last = next((e for e in reversed(log_history) if "eval_loss" in e), None)
    if last is not None and last.get("step") == trainer.state.global_step:
        metrics = dict(last)
    else:
        metrics = trainer.evaluate(metric_key_prefix="eval")
    return metrics  # perplexity (causal-lm) is added from the loss by artifacts
