"""Distillation in a stock HF Trainer: make_callbacks(..., distillation=...), snapshot timing, logs,
exact resume of a "self" teacher, gradient accumulation, bf16, bad teachers refused before compute."""

import pytest
import torch

pytest.importorskip("transformers")

from helpers import tiny_bert_classifier, tiny_llama_lm, toy_classification_rows  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from prune_callbacks.controllers.distillation import TEACHER_FILE, DistillationConfig, DistillationConfigError  # noqa: E402
from prune_callbacks.integrations.trainer.distillation import DistillationCallback  # noqa: E402
from prune_callbacks.integrations.trainer import make_callbacks  # noqa: E402

PRUNING = dict(final_sparsity=0.6, start_step=3, end_step=7, update_every=1)  # first mask update at step 3


def build(out, callbacks, *, model=None, rows=None, **overrides):
    kwargs = dict(output_dir=str(out), use_cpu=True, report_to=[], save_strategy="steps", save_steps=4, logging_steps=2,
                  max_steps=8, per_device_train_batch_size=8, disable_tqdm=True, seed=0)
    kwargs.update(overrides)
    trainer = Trainer(model=model if model is not None else tiny_bert_classifier(), args=TrainingArguments(**kwargs),
                      train_dataset=rows if rows is not None else toy_classification_rows(96), callbacks=callbacks)
    trainer.model_accepts_loss_kwargs = False
    return trainer


def distill_cb(callbacks) -> DistillationCallback:
    return next(cb for cb in callbacks if isinstance(cb, DistillationCallback))


class StateAt(TrainerCallback):
    def __init__(self, step, stop=False):
        self.step, self.stop, self.state = step, stop, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if self.stop:
                control.should_training_stop = True


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_before_pruning_teacher_logs_and_forward_restored(tmp_path):
    callbacks = make_callbacks(**PRUNING, distillation={"hardness": 0.5})
    at2 = StateAt(2)
    trainer = build(tmp_path, [*callbacks, at2])
    trainer.train()
    d = distill_cb(callbacks).distiller
    assert d.teacher_step == 2  # the step before the first mask update
    assert same(d.teacher.state_dict(), at2.state)  # the dense model of that step
    logs = {e["step"]: e for e in trainer.state.log_history if "loss" in e}
    assert "distill/kd_loss" not in logs[2]  # no teacher yet
    for step in (4, 6, 8):
        assert logs[step]["distill/kd_loss"] >= 0 and logs[step]["distill/task_loss"] > 0
    assert "forward" not in trainer.model.__dict__
    assert callbacks.pruner.finalized and callbacks.pruner.mask_sparsity == pytest.approx(0.6, abs=0.02)


def test_resume_restores_the_teacher_bitwise(tmp_path):
    full_cbs = make_callbacks(**PRUNING, distillation={"hardness": 0.7})
    full = build(tmp_path / "full", full_cbs)
    full.train()

    cut_cbs = make_callbacks(**PRUNING, distillation={"hardness": 0.7})
    build(tmp_path / "cut", [*cut_cbs, StateAt(4, stop=True)]).train()
    ckpt = tmp_path / "cut" / "checkpoint-4"
    assert (ckpt / TEACHER_FILE).is_file()
    cut_teacher = distill_cb(cut_cbs).distiller.teacher.state_dict()

    resumed_cbs = make_callbacks(**PRUNING, distillation={"hardness": 0.7})
    resumed = build(tmp_path / "cut", resumed_cbs)
    resumed.train(resume_from_checkpoint=str(ckpt))
    d = distill_cb(resumed_cbs).distiller
    assert same(d.teacher.state_dict(), cut_teacher) and d.teacher_step == 2
    assert same(d.teacher.state_dict(), distill_cb(full_cbs).distiller.teacher.state_dict())
    # a re-snapshot would have copied the pruned model of step 4: the teacher is dense
    assert all(torch.count_nonzero(w) == w.numel() for w in (d.teacher.bert.encoder.layer[0].attention.self.query.weight,))
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # the resumed run continues exactly


def test_resume_without_saved_teacher_is_an_error(tmp_path):
    build(tmp_path, [*make_callbacks(**PRUNING, distillation={}), StateAt(4, stop=True)]).train()
    (tmp_path / "checkpoint-4" / TEACHER_FILE).unlink()
    trainer = build(tmp_path, make_callbacks(**PRUNING, distillation={}))
    with pytest.raises(RuntimeError, match="cannot be re-copied"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))


@pytest.mark.parametrize("teacher, overrides, match", [
    (lambda: tiny_bert_classifier(num_labels=3), {}, "num_labels=3"),
    (lambda: "self", {"label_smoothing_factor": 0.1}, "label_smoothing_factor"),
])
def test_bad_teacher_or_setup_fails_before_any_step(tmp_path, teacher, overrides, match):
    callbacks = make_callbacks(**PRUNING, distillation=DistillationConfig(teacher=teacher()))
    trainer = build(tmp_path, callbacks, **overrides)
    callbacks.bind(trainer)  # the Trainer's own settings are checked once the callbacks know it
    with pytest.raises(DistillationConfigError, match=match):
        trainer.train()
    assert trainer.state.global_step == 0


def test_before_pruning_without_pruning_callbacks_is_an_error(tmp_path):
    trainer = build(tmp_path, [DistillationCallback()])
    with pytest.raises(DistillationConfigError, match="train_begin"):
        trainer.train()


def lm_rows(n=16, seq=10, vocab=97, seed=0):
    """Causal-LM rows with a different number of labelled tokens each (num_items_in_batch matters)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(3, vocab, (seq,), generator=g).tolist()
        labels = [-100] * (1 + i % 7) + ids[1 + i % 7:]
        rows.append({"input_ids": ids, "attention_mask": [1] * seq, "labels": labels})
    return rows


def test_gradient_accumulation_matches_one_big_batch_causal_lm(tmp_path):
    """Llama's loss is normalised over num_items_in_batch; the KD term must be too."""
    results = []
    for batch, accumulation in ((8, 1), (4, 2)):
        cb = DistillationCallback(snapshot="train_begin", hardness=0.5, temperature=2.0)
        trainer = Trainer(model=tiny_llama_lm(), train_dataset=lm_rows(), callbacks=[cb], args=TrainingArguments(
            output_dir=str(tmp_path / f"b{batch}"), use_cpu=True, report_to=[], save_strategy="no", max_steps=2,
            per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, learning_rate=1e-2,
            disable_tqdm=True, seed=0, logging_steps=1))
        assert trainer.model_accepts_loss_kwargs
        trainer.train()
        results.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
        assert trainer.state.log_history[0]["distill/kd_loss"] == 0  # step 1: the teacher is the model
        assert trainer.state.log_history[1]["distill/kd_loss"] > 0
    start = tiny_llama_lm().state_dict()
    assert any(not torch.allclose(start[k], results[0][k]) for k in start)
    for k in results[0]:
        assert torch.allclose(results[0][k], results[1][k], atol=2e-5), k


def test_bf16_autocast_with_bf16_teacher(tmp_path):
    callbacks = make_callbacks(**PRUNING, distillation={"teacher_dtype": "bf16", "hardness": 1.0})
    trainer = build(tmp_path, callbacks, bf16=True, save_strategy="no")
    trainer.train()
    d = distill_cb(callbacks).distiller
    assert next(d.teacher.parameters()).dtype == torch.bfloat16
    kd = [e["distill/kd_loss"] for e in trainer.state.log_history if "distill/kd_loss" in e]
    assert kd and all(v == v and v >= 0 for v in kd)
