"""What real training scripts do with the Trainer (issue 17): returned metrics, log_history, loss scaling, short runs."""

import json
import logging
from types import SimpleNamespace

import pytest

pytest.importorskip("transformers")

from helpers import tiny_bert_classifier, tiny_llama_lm, toy_classification_rows  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.trainer_utils import default_compute_objective  # noqa: E402

from prune_callbacks.core.figures import is_figure_key  # noqa: E402
from prune_callbacks.integrations.trainer import make_callbacks  # noqa: E402
from prune_callbacks.integrations.trainer.logs import place_in_log_history  # noqa: E402
from prune_callbacks.integrations.trainer.loss_scaling import loss_scaling_problem  # noqa: E402


def build(tmp_path, callbacks, *, model=None, bind=None, **overrides):
    kwargs = dict(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], save_strategy="no", logging_steps=2,
                  max_steps=4, per_device_train_batch_size=8, disable_tqdm=True, seed=0)
    kwargs.update(overrides)
    trainer = Trainer(model=model if model is not None else tiny_bert_classifier(), args=TrainingArguments(**kwargs),
                      train_dataset=toy_classification_rows(64), eval_dataset=toy_classification_rows(8, seed=1),
                      callbacks=callbacks)
    if bind is not None:
        bind.bind(trainer)
    return trainer


class Seen(TrainerCallback):
    """Stands for a tracker: every logs dict it is handed."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_figures_stay_out_of_returned_metrics(tmp_path):
    cbs = make_callbacks(final_sparsity=0.5, start_step=1, end_step=2, update_every=1)
    seen = Seen()
    trainer = build(tmp_path, [*cbs, seen], bind=cbs)
    trainer.model_accepts_loss_kwargs = False
    output = trainer.train()
    evaluated = trainer.evaluate()
    for metrics in (output.metrics, evaluated):
        assert metrics and not [k for k in metrics if is_figure_key(k)], metrics
    # so the hyper-parameter-search objective is what it is without pruning
    assert default_compute_objective(evaluated) == evaluated["eval_loss"]
    trainer.save_metrics("all", {**output.metrics, **evaluated})
    assert not [k for k in json.loads((tmp_path / "out" / "all_results.json").read_text()) if is_figure_key(k)]
    # trackers get the figures at every training log; log_history holds them in every entry, except an
    # evaluation's, which the model card reads as results: there they follow in an entry of their own (same step)
    step_logs = [logs for logs in seen.logs if "loss" in logs]
    assert len(step_logs) == 2 and all(logs["sparsity/global"] == pytest.approx(0.5, abs=1e-3) for logs in step_logs)
    history = trainer.state.log_history
    for i, entry in enumerate(history):
        if "eval_loss" in entry:
            assert not [k for k in entry if is_figure_key(k)], entry
            after = history[i + 1]
            assert after["step"] == entry["step"] and "sparsity/global" in after and "eval_loss" not in after
        else:
            assert "sparsity/global" in entry, entry
    assert "eval_loss" in history[-2] and "sparsity/scheduled" in history[-1]


class LogHistoryProbe(TrainerCallback):
    """What `place_in_log_history` relies on, checked at every on_log of a plain Trainer run."""

    def __init__(self):
        self.checked = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        entry = state.log_history[-1]
        assert entry == {**logs, "step": state.global_step}  # appended before on_log, a copy plus "step"
        assert entry is not logs
        assert place_in_log_history(state, {"probe/x": 1.0}) and state.log_history[-1]["probe/x"] == 1.0
        assert "probe/x" not in logs
        self.checked += 1


def test_log_history_workaround_still_matches_transformers(tmp_path):
    """Fails if transformers changes how Trainer.log fills log_history (then place_in_log_history must change)."""
    probe = LogHistoryProbe()
    trainer = build(tmp_path, [probe], max_steps=2, logging_steps=1)
    trainer.train()
    trainer.evaluate()
    assert probe.checked == 4  # two step logs, the train-end metrics, the evaluation


def test_loss_scaling_is_detected_only_where_it_bites():
    from transformers import TrainingArguments as TA

    bert, llama = tiny_bert_classifier(), tiny_llama_lm()
    accumulate = TA(output_dir="/tmp/x", use_cpu=True, gradient_accumulation_steps=2, report_to=[])
    plain = TA(output_dir="/tmp/x", use_cpu=True, report_to=[])
    assert "gradient_accumulation_steps=2" in loss_scaling_problem(bert, accumulate)
    assert loss_scaling_problem(bert, plain) is None  # one process, no accumulation: the loss is right
    assert loss_scaling_problem(llama, accumulate) is None  # its loss_function normalises with num_items_in_batch
    ddp = SimpleNamespace(gradient_accumulation_steps=1, world_size=2)  # what TrainingArguments says under torchrun
    assert "2 processes" in loss_scaling_problem(bert, ddp) and "2x too large" in loss_scaling_problem(bert, ddp)


@pytest.mark.parametrize("fix", [True, False])
def test_loss_scaling_fixed_or_warned(tmp_path, caplog, fix):
    cbs = make_callbacks(final_sparsity=0.5, start_step=1, end_step=2, update_every=1, fix_loss_scaling=fix)
    trainer = build(tmp_path, cbs, bind=cbs, max_steps=2, gradient_accumulation_steps=2, per_device_train_batch_size=4)
    assert trainer.model_accepts_loss_kwargs  # what transformers decides for BERT
    with caplog.at_level(logging.WARNING, logger="prune_callbacks"):
        trainer.train()
    assert trainer.model_accepts_loss_kwargs is (not fix)
    assert "trainer.model_accepts_loss_kwargs = False" in caplog.text and "gradient_accumulation_steps=2" in caplog.text
    if fix:
        assert "set trainer.model_accepts_loss_kwargs = False:" in caplog.text


def test_fixed_loss_scaling_gives_the_loss_of_an_unaccumulated_run(tmp_path):
    """The fix is the real one: accumulating 2 x 4 logs the same loss as batches of 8 (it was twice that)."""
    def first_loss(accumulation, fix):
        cbs = make_callbacks(final_sparsity=0.5, start_step=2, end_step=2, fix_loss_scaling=fix)
        model = tiny_bert_classifier(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        trainer = build(tmp_path, cbs, model=model, bind=cbs, max_steps=2, logging_steps=1,
                        gradient_accumulation_steps=accumulation,
                        per_device_train_batch_size=8 // accumulation, max_grad_norm=0.0)
        trainer.train()
        return trainer.state.log_history[0]["loss"]

    reference = first_loss(1, True)
    assert first_loss(2, True) == pytest.approx(reference, rel=1e-4)
    assert first_loss(2, False) == pytest.approx(2 * reference, rel=1e-4)


def test_a_30_step_run_updates_masks_gradually(tmp_path):
    """Short runs: the default update interval must not collapse the schedule into one update (issue 17.3)."""
    cbs = make_callbacks(final_sparsity=0.8, start_step=0.1, end_step=0.7)  # default update_every
    probe = []

    class Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            probe.append((state.global_step, cbs.pruner.mask_updates, float(cbs.pruner.report()["global_sparsity"])))

    trainer = build(tmp_path, [*cbs, Count()], bind=cbs, max_steps=30, logging_steps=10, per_device_train_batch_size=2)
    trainer.model_accepts_loss_kwargs = False
    trainer.train()
    updates = cbs.pruner.mask_updates
    assert updates >= 4, f"{updates} mask updates in a 30-step run with the default update_every"
    assert cbs.pruner.report()["groups"][0]["update_every"] < 25  # derived from the 18-step window
    at = {step: sparsity for step, _, sparsity in probe}
    assert 0.0 < at[10] < at[15] < at[21] <= 0.8  # checkpoints 10 and 20 are not dense
    assert cbs.pruner.report()["global_sparsity"] == pytest.approx(0.8, abs=1e-3)
