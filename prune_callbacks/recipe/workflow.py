"""``finetune``: fine-tune while pruning (evaluating the dense model at train begin or just before
the first mask update, per ``evaluation.dense``), evaluate the pruned model, make the masks
permanent, save. The artifacts (report.json, REPORT.md, sparsity.png) come from :mod:`.artifacts`.

The pruning itself is the stock Trainer integration
(:func:`prune_callbacks.integrations.trainer.make_callbacks`); this module only wires a
validated `Recipe` to data, model, ``TrainingArguments`` and ``Trainer``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from prune_callbacks.recipe.errors import FinalSaveError
from prune_callbacks.recipe.evaluation import final_evaluation, make_compute_metrics
from prune_callbacks.recipe.loading import recipe_to_yaml
from prune_callbacks.recipe.schema import Recipe

RESOLVED_NAME = "recipe.resolved.yaml"


@dataclass
class RunResult:
    output_dir: Path
    report: dict
    summary: str


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
            report = pruner.report()
            self.steps.append(state.global_step)
            self.target.append(float(report["scheduled_sparsity"]))
            self.achieved.append(float(report["global_sparsity"]))

    return SparsityRecorder


def run_recipe(recipe: Recipe, recipe_path: Optional[str] = None) -> RunResult:
    """Run a validated recipe end to end; returns the report and the printed summary.

    The same checks as ``validate --load`` run first (:mod:`.preflight`); the output directory
    follows :mod:`.lifecycle` (marker while running, staged artefacts moved in at the end,
    cleanup on failure, resume from the newest complete checkpoint with ``output.resume``)."""
    from transformers import set_seed

    from prune_callbacks.recipe.lifecycle import RunDirectory
    from prune_callbacks.recipe.preflight import check_recipe, seed_of

    started = time.time()
    set_seed(seed_of(recipe))
    pre = check_recipe(recipe, load_model=True)  # nothing is written before every check passed
    rank0 = int(os.environ.get("RANK", "0")) == 0
    run_dir = RunDirectory(pre.plan)
    if rank0:
        run_dir.begin(recipe.model_dump(mode="json"))
    try:
        return _train_and_save(recipe, recipe_path, pre, run_dir, started, rank0)
    except FinalSaveError:  # staging and checkpoints are kept, and the message says where
        raise
    except KeyboardInterrupt as exc:  # Ctrl-C, and SIGTERM (the CLI turns it into one): say what is left
        if rank0:
            exc.left = run_dir.abort()
        raise
    except BaseException:  # torch errors included: leave nothing that blocks the next run
        if rank0:
            run_dir.abort()
        raise


def _train_and_save(recipe: Recipe, recipe_path: Optional[str], pre, run_dir, started: float, rank0: bool) -> RunResult:
    from transformers import Trainer

    from prune_callbacks.integrations.trainer import make_callbacks
    from prune_callbacks.recipe import artifacts
    from prune_callbacks.recipe.data import prepare
    from prune_callbacks.recipe.training_args import build_training_arguments

    out = run_dir.out
    model, tokenizer = pre.model, pre.tokenizer
    data = prepare(recipe, tokenizer, pre.train_raw, pre.eval_raw, pre.label_map)
    loaded = time.time()

    args = build_training_arguments(recipe.training, str(run_dir.checkpoints), **training_defaults(recipe))
    reporting = [r for r in (args.report_to or []) if r != "none"]
    resume_from = str(pre.plan.resume_from) if pre.plan.resume_from is not None else None
    # per-layer-kind figures go to experiment trackers; the console and log_history get the totals only
    callbacks = make_callbacks(recipe.pruning, evaluate_dense=recipe.evaluation.dense, log_per_group=bool(reporting),
                               distillation=recipe.distillation,
                               **({"resume_from": resume_from} if resume_from else {}))
    recorder = _recorder_class()(callbacks)
    trainer = Trainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                      data_collator=data.collator, processing_class=tokenizer,
                      compute_metrics=make_compute_metrics(recipe, len(pre.label_names or []) or None),
                      callbacks=[*callbacks, recorder])
    callbacks.bind(trainer)
    # transformers does not scale the loss of **kwargs models under gradient accumulation (see trainer.py)
    trainer.model_accepts_loss_kwargs = False

    # dense eval (train begin / before pruning); masks made permanent at train end
    train_output = trainer.train(resume_from_checkpoint=resume_from)
    trained = time.time()
    log_history = list(trainer.state.log_history)
    pruned_metrics = final_evaluation(trainer, log_history)
    pruner = callbacks.pruner
    if pruner is not None and not pruner.finalized:  # PermanentMaskCallback does it; never save live masks
        pruner.finalize()
    measured = exported = None
    if recipe.output.slim:  # figures from the masked model, then export the compact form (see .slimming)
        from prune_callbacks.recipe.slimming import slim_model

        measured, exported = slim_model(model, pruner, lambda: artifacts.measure_sparsity(model, pruner))

    if not trainer.is_world_process_zero() or not rank0:  # multi-process launch: rank 0 writes everything
        return RunResult(out, {}, "")
    with run_dir.final_save() as staging:  # a full disk: FinalSaveError saying what is kept
        (staging / RESOLVED_NAME).write_text(recipe_to_yaml(recipe), encoding="utf-8")
        from prune_callbacks.recipe.slimming import save_model

        save_model(model, staging, tokenizer if recipe.output.save_tokenizer else None)  # factorised: save_low_rank
        sparse_info = None
        if recipe.output.save_sparse and exported is None:  # an exported model is not masked: nothing to compress
            from prune_callbacks.export.sparse_io import save_sparse

            sparse_info = save_sparse(model, staging / "sparse",
                                      tokenizer=tokenizer if recipe.output.save_tokenizer else None)
        saved = time.time()

        report = artifacts.build_report(
            recipe=recipe, recipe_path=recipe_path, out=out, model=model, pruner=pruner, log_history=log_history,
            global_step=trainer.state.global_step,
            train_output=train_output, pruned_metrics=pruned_metrics, recorder=recorder, data=data,
            sparse_info=sparse_info, timing={"load_s": loaded - started, "train_s": trained - loaded,
                                             "save_s": saved - trained, "total_s": time.time() - started},
            written=staging, measured=measured, exported=exported,
        )
        if resume_from:
            report["training"]["resumed_from"] = resume_from
        if recipe.distillation is not None:  # distill/* figures of the run (issue 12)
            from prune_callbacks.controllers.distillation.report import distillation_summary

            report["distillation"] = distillation_summary(recipe.distillation, log_history, callbacks)
        if callbacks.guard is not None:  # the guard's trajectory and answer (issue 15)
            report["accuracy_guard"] = callbacks.guard.report()
        artifacts.write_all(report, staging, plot=recipe.output.plot)
        run_dir.publish()
        from prune_callbacks.recipe.summary import run_summary

        return RunResult(out, report, run_summary(report))
