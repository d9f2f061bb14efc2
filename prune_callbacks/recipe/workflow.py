"""``finetune``: fine-tune while pruning (evaluating the dense model at train begin or just before
the first mask update, per ``evaluation.dense``), evaluate the pruned model, make the masks
permanent, save. The artifacts (report.json, REPORT.md, sparsity.png) come from :mod:`.artifacts`.

The pruning itself is the stock Trainer integration
(:func:`prune_callbacks.integrations.trainer.make_callbacks`); this module only wires a
validated `Recipe` to data, model, ``TrainingArguments`` and ``Trainer``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .loading import RecipeError, recipe_to_yaml
from .schema import Recipe

RESOLVED_NAME = "recipe.resolved.yaml"


@dataclass
class RunResult:
    output_dir: Path
    report: dict
    summary: str


def check_output_dir(recipe: Recipe) -> Path:
    """The output directory, created; refuses a non-empty one unless output.overwrite."""
    out = Path(recipe.output.dir).expanduser()
    if out.exists() and not out.is_dir():
        raise RecipeError([("output.dir", f"{str(out)!r} exists and is not a directory")], source="output")
    if out.is_dir() and any(out.iterdir()) and not recipe.output.overwrite:
        raise RecipeError([("output.dir", f"{str(out)!r} is not empty; allowed: a new or empty directory, "
                                          "or output.overwrite: true (--set output.overwrite=true)")], source="output")
    out.mkdir(parents=True, exist_ok=True)
    return out


@contextlib.contextmanager
def quiet_transformers():
    """Hide load-time chatter (e.g. the expected 'newly initialized classifier' report); progress bars stay."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def make_compute_metrics(recipe: Recipe, num_labels: Optional[int]):
    """``compute_metrics`` for classification (argmax of the logits); None for causal-lm (perplexity
    comes from the eval loss, so no logits are gathered)."""
    if recipe.task != "sequence-classification":
        return None
    from ..assets import load_metric

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


def final_evaluation(trainer, log_history: list[dict]) -> dict:
    """Metrics of the pruned model: the evaluation Trainer ran at the last step if there was one (the
    weights are the same: finalizing only re-applies the masks), else a fresh ``evaluate()``."""
    last = next((e for e in reversed(log_history) if "eval_loss" in e), None)
    if last is not None and last.get("step") == trainer.state.global_step:
        metrics = dict(last)
    else:
        metrics = trainer.evaluate(metric_key_prefix="eval")
    return metrics  # perplexity (causal-lm) is added from the loss by artifacts


def training_defaults(recipe: Recipe) -> dict:
    """TrainingArguments the workflow sets unless the recipe's training section does."""
    import torch

    defaults = {"report_to": "none", "dataloader_pin_memory": torch.cuda.is_available()}
    n = recipe.evaluation.during_training
    if "eval_strategy" not in recipe.training and n > 0:
        defaults.update(eval_strategy="steps", eval_steps=1.0 / n if n > 1 else 0.999)
    return defaults


def _recorder_class():
    from transformers import TrainerCallback

    class SparsityRecorder(TrainerCallback):
        """Target and achieved sparsity of the pruned layers after each optimizer step (thinned to ~200 points)."""

        def __init__(self, callbacks):
            self.callbacks = callbacks
            self.steps, self.target, self.achieved = [], [], []

        def on_train_begin(self, args, state, control, **kwargs):
            self.on_step_end(args, state, control)

        def on_step_end(self, args, state, control, **kwargs):
            pruner = self.callbacks.pruner
            every = max(1, state.max_steps // 200)
            if pruner is None or (state.global_step % every and state.global_step != state.max_steps):
                return
            pruned = sum(int(m.sum()) for m in pruner.pruned)
            total = sum(m.numel() for m in pruner.pruned)
            self.steps.append(state.global_step)
            self.target.append(float(pruner.scheduled_sparsity()))
            self.achieved.append(pruned / total if total else 0.0)

    return SparsityRecorder


def run_recipe(recipe: Recipe, recipe_path: Optional[str] = None) -> RunResult:
    """Run a validated recipe end to end; returns the report and the printed summary."""
    from transformers import Trainer, set_seed

    from ..integrations.trainer import make_callbacks
    from . import artifacts
    from .data import load_data, prepare
    from .models import load_model, max_positions
    from .training_args import build_training_arguments

    started = time.time()
    out = check_output_dir(recipe)
    seed = int(recipe.training.get("seed", 42))
    set_seed(seed)

    with quiet_transformers():
        train_raw, eval_raw, label_names, label_map = load_data(recipe, seed)
        model, tokenizer = load_model(recipe, label_names)
    limit = max_positions(model, tokenizer)
    if limit is not None and recipe.data.max_length > limit:
        raise RecipeError([("data.max_length", f"max_length={recipe.data.max_length} is longer than the model accepts; "
                                               f"allowed: <= {limit}")], source="data")
    data = prepare(recipe, tokenizer, train_raw, eval_raw, label_map)
    loaded = time.time()

    args = build_training_arguments(recipe.training, str(out / "checkpoints"), **training_defaults(recipe))
    reporting = [r for r in (args.report_to or []) if r != "none"]
    # per-layer-kind figures go to experiment trackers; the console and log_history get the totals only
    callbacks = make_callbacks(recipe.pruning, evaluate_dense=recipe.evaluation.dense, log_per_group=bool(reporting),
                               distillation=recipe.distillation)
    recorder = _recorder_class()(callbacks)
    trainer = Trainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                      data_collator=data.collator, processing_class=tokenizer,
                      compute_metrics=make_compute_metrics(recipe, len(label_names or []) or None),
                      callbacks=[*callbacks, recorder])
    callbacks.bind(trainer)
    # transformers does not scale the loss of **kwargs models under gradient accumulation (see trainer.py)
    trainer.model_accepts_loss_kwargs = False

    train_output = trainer.train()  # dense eval (train begin / before pruning); masks made permanent at train end
    trained = time.time()
    log_history = list(trainer.state.log_history)
    pruned_metrics = final_evaluation(trainer, log_history)
    pruner = callbacks.pruner
    if pruner is not None and not pruner.finalized:  # PermanentMaskCallback does it; never save live masks
        pruner.finalize()

    if not trainer.is_world_process_zero():  # multi-process launch: rank 0 writes everything
        return RunResult(out, {}, "")
    (out / RESOLVED_NAME).write_text(recipe_to_yaml(recipe), encoding="utf-8")
    model.save_pretrained(out)
    if recipe.output.save_tokenizer:
        tokenizer.save_pretrained(out)
    sparse_info = None
    if recipe.output.save_sparse:
        from ..sparse_io import save_sparse

        sparse_info = save_sparse(model, out / "sparse", tokenizer=tokenizer if recipe.output.save_tokenizer else None)
    saved = time.time()
    checkpoints = out / "checkpoints"
    if checkpoints.is_dir() and not any(checkpoints.iterdir()):
        checkpoints.rmdir()

    report = artifacts.build_report(
        recipe=recipe, recipe_path=recipe_path, out=out, model=model, pruner=pruner, log_history=log_history,
        global_step=trainer.state.global_step,
        train_output=train_output, pruned_metrics=pruned_metrics, recorder=recorder, data=data,
        sparse_info=sparse_info, timing={"load_s": loaded - started, "train_s": trained - loaded,
                                         "save_s": saved - trained, "total_s": time.time() - started},
    )
    if recipe.distillation is not None:  # distill/* figures of the run (issue 12)
        from ..distillation.report import distillation_summary

        report["distillation"] = distillation_summary(recipe.distillation, log_history, callbacks)
    artifacts.write_all(report, out, plot=recipe.output.plot)
    from .summary import run_summary

    return RunResult(out, report, run_summary(report))
