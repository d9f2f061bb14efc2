"""Accuracy guard inside a stock Trainer: tiny BERT, the Trainer's own eval_dataset / compute_metrics."""

import os
import sys

import numpy as np
import pytest

pytest.importorskip("transformers")
from transformers import Trainer, TrainingArguments  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from helpers import tiny_bert_classifier, toy_classification_rows  # noqa: E402

from prune_callbacks.core import figures  # noqa: E402
from prune_callbacks.integrations.trainer import make_callbacks  # noqa: E402


def accuracy(pred):
    return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}


S_STAR = 0.6


def build(tmp_path, guard, *, eval_rows=True, compute_metrics="synthetic", max_steps=30, **overrides):
    callbacks = make_callbacks(final_sparsity=0.95, start_step=2, end_step=14, update_every=2, saliency="magnitude",
                               accuracy_guard=guard)
    if compute_metrics == "synthetic":
        def compute_metrics(pred):
            """Real accuracy, and a score with a known breaking point: it collapses above measured sparsity s*."""
            measured = callbacks.pruner.report()["global_sparsity"]
            return {**accuracy(pred), "score": 1.0 if measured <= S_STAR else 0.0}

    kwargs = dict(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], save_strategy="no", logging_steps=2,
                  max_steps=max_steps, per_device_train_batch_size=8, per_device_eval_batch_size=8,
                  disable_tqdm=True, seed=0, learning_rate=1e-3)
    kwargs.update(overrides)
    trainer = Trainer(model=tiny_bert_classifier(), args=TrainingArguments(**kwargs),
                      train_dataset=toy_classification_rows(32), callbacks=callbacks,
                      eval_dataset=toy_classification_rows(8, seed=1) if eval_rows else None,
                      compute_metrics=compute_metrics)
    trainer.model_accepts_loss_kwargs = False
    callbacks.bind(trainer)
    return trainer, callbacks


GUARD = {"metric": "eval_score", "max_drop": 0.0, "every": 2, "patience": 2}
SAVE_AT = 12


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One guarded run (checkpoint at SAVE_AT), shared by the result and resume tests."""
    folder = tmp_path_factory.mktemp("guard_full")
    trainer, callbacks = build(folder, GUARD, save_strategy="steps", save_steps=SAVE_AT, logging_steps=10)
    trainer.train()
    return folder, trainer, callbacks


def test_guarded_run_ends_at_a_measured_sparsity(full_run):
    _, trainer, callbacks = full_run
    (report,) = callbacks.guard.report()
    traj = report["trajectory"]
    # baseline "before_pruning" (default): after step 1, the last dense step (first masks at step 2)
    assert traj[0]["decision"] == "baseline" and traj[0]["sparsity"] == 0.0 and traj[0]["step"] == 1
    decisions = [r["decision"] for r in traj]
    assert "hold" in decisions and "rollback" in decisions, traj
    final = report["final"]
    assert traj[-1]["decision"] == "final" and final["met"]
    assert 0.4 < final["sparsity"] <= S_STAR + 1e-6, traj
    # measured at the final sparsity: evaluating the finalized model gives the same metric
    assert trainer.evaluate()["eval_score"] == final["metric"] == 1.0
    assert callbacks.pruner.report()["global_sparsity"] == pytest.approx(final["sparsity"], abs=0.01)
    logged = [e for e in trainer.state.log_history if figures.GUARD_DECISION in e]
    assert logged and all(figures.GUARD_METRIC in e and figures.GUARD_SPARSITY in e for e in logged)


def test_no_eval_dataset_is_an_error_at_train_begin(tmp_path):
    trainer, _ = build(tmp_path, {"metric": "eval_accuracy"}, eval_rows=False)
    with pytest.raises(ValueError, match="needs an eval_dataset"):
        trainer.train()
    assert trainer.state.global_step == 0


@pytest.mark.parametrize("when, step", [("train_begin", 0), ("before_pruning", 1)])
def test_metric_never_returned_is_an_error_listing_the_keys(tmp_path, when, step):
    trainer, callbacks = build(tmp_path, {"metric": "eval_accuracy", "baseline": when}, compute_metrics=None)
    with pytest.raises(ValueError, match=r"eval_accuracy.*eval_loss"):
        trainer.train()
    assert trainer.state.global_step == step and callbacks.pruner.mask_updates == 0  # before any weight is pruned


def test_resume_reproduces_the_guarded_run(full_run):
    folder, _, cb_full = full_run
    by_step = {r["step"]: r["decision"] for r in cb_full.guard.report()[0]["trajectory"]}
    assert by_step.get(SAVE_AT) in ("hold", "rollback"), by_step
    assert (folder / "out" / f"checkpoint-{SAVE_AT}" / "guard_state.safetensors").is_file()  # the checkpoint is taken inside a hold/rollback
    resumed, cb_res = build(folder, GUARD, save_strategy="no", logging_steps=10)
    resumed.train(resume_from_checkpoint=str(folder / "out" / f"checkpoint-{SAVE_AT}"))
    a, b = cb_full.guard.report()[0], cb_res.guard.report()[0]
    assert [r["decision"] for r in a["trajectory"]] == [r["decision"] for r in b["trajectory"]]
    assert b["final"]["sparsity"] == pytest.approx(a["final"]["sparsity"])
    assert b["final"] == a["final"]


@pytest.mark.parametrize("when, step", [("train_begin", 0), ("before_pruning", 1)])
def test_baseline_timing(tmp_path, when, step):
    trainer, callbacks = build(tmp_path, {**GUARD, "baseline": when}, max_steps=14)
    trainer.train()
    (report,) = callbacks.guard.report()
    assert report["trajectory"][0] == {"step": step, "sparsity": 0.0, "metric": 1.0, "decision": "baseline"}
