"""Trainer checkpoints hold the pruning state; resume is exact; the final model is plainly loadable."""

import importlib.util
import json
import logging
import os
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from helpers import tiny_bert_classifier, toy_classification_rows  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForSequenceClassification, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from prune_callbacks.integrations.trainer import make_callbacks  # noqa: E402
from prune_callbacks.core.state_io import STATE_FILE, load_state_file  # noqa: E402

CONFIG = dict(final_sparsity=0.6, start_step=1, end_step=7, update_every=1)


def build(out, callbacks, *, eval_rows=None, **overrides):
    kwargs = dict(output_dir=str(out), use_cpu=True, report_to=[], save_strategy="steps", save_steps=4, logging_steps=2,
                  max_steps=8, per_device_train_batch_size=8, disable_tqdm=True, seed=0)
    kwargs.update(overrides)
    trainer = Trainer(model=tiny_bert_classifier(), args=TrainingArguments(**kwargs), train_dataset=toy_classification_rows(96),
                      eval_dataset=eval_rows, callbacks=callbacks)
    trainer.model_accepts_loss_kwargs = False
    return trainer


class StopAt(TrainerCallback):
    """Simulates an interruption right after the checkpoint at ``step`` is written."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def state_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_checkpoint_holds_state_and_resume_is_exact(tmp_path):
    full_cbs = make_callbacks(**CONFIG)
    full = build(tmp_path / "full", full_cbs)
    full.train()

    first = build(tmp_path / "cut", [*make_callbacks(**CONFIG), StopAt(4)])
    first.train()
    assert first.state.global_step == 4
    ckpt = tmp_path / "cut" / "checkpoint-4"
    saved = load_state_file(ckpt / STATE_FILE)
    assert saved["step"] == 4 and saved["global_step"] == 4 and saved["total_steps"] == 8
    assert set(saved["saliency"]) == {"importance"}
    weights = load_file(str(ckpt / "model.safetensors"))
    assert 0.3 < saved["mask_sparsity"] < 0.6
    for name, mask in saved["masks"].items():
        assert mask.any() and torch.all(weights[f"{name}.weight"][mask] == 0)  # weights already masked
    reference = load_state_file(tmp_path / "full" / "checkpoint-4" / STATE_FILE)
    for name in saved["masks"]:
        assert torch.equal(saved["masks"][name], reference["masks"][name])
        assert torch.equal(saved["saliency"]["importance"][name], reference["saliency"]["importance"][name])

    resumed_cbs = make_callbacks(**CONFIG)
    resumed = build(tmp_path / "cut", resumed_cbs)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed_cbs.engine.resumed_from == str(ckpt / STATE_FILE)
    a, b = full_cbs.pruner, resumed_cbs.pruner
    assert (b.step, b.mask_updates, b.mask_sparsity) == (a.step, a.mask_updates, a.mask_sparsity) == (8, 7, 0.6)
    for ma, mb in zip(a.pruned, b.pruned):
        assert torch.equal(ma, mb)
    sa, sb = state_of(full.model), state_of(resumed.model)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_resume_without_pruning_state_is_refused(tmp_path):
    first = build(tmp_path / "out", [*make_callbacks(**CONFIG), StopAt(4)])
    first.train()
    os.remove(tmp_path / "out" / "checkpoint-4" / STATE_FILE)
    again = build(tmp_path / "out", make_callbacks(**CONFIG))
    with pytest.raises(RuntimeError, match=r"resumes at global step 4 from a checkpoint whose run wrote a pruning state "
                                           r"to .*checkpoint-4.*, but no pruning state for that step was found"):
        again.train(resume_from_checkpoint=True)


def test_resume_from_a_moved_checkpoint_with_resume_from(tmp_path):
    first = build(tmp_path / "a", [*make_callbacks(**CONFIG), StopAt(4)])
    first.train()
    moved = tmp_path / "elsewhere" / "ckpt"
    shutil.copytree(tmp_path / "a" / "checkpoint-4", moved)
    cbs = make_callbacks(**CONFIG, resume_from=str(moved))
    trainer = build(tmp_path / "b", cbs)  # a new output_dir holding no checkpoint-4
    trainer.train(resume_from_checkpoint=str(moved))
    assert cbs.engine.resumed_from == str(moved / STATE_FILE) and cbs.pruner.step == 8


def test_save_model_loads_with_plain_from_pretrained(tmp_path):
    cbs = make_callbacks(**CONFIG)
    trainer = build(tmp_path / "out", cbs, save_strategy="no")
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    loaded, info = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "final"), output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    ours, theirs = state_of(trainer.model), state_of(loaded)
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    pruner = cbs.pruner
    for target, mask in zip(pruner.targets, pruner.pruned):
        w = theirs[target.param_name]
        assert int((w == 0).sum()) >= int(mask.sum()) > 0 and torch.all(w[mask] == 0)
        assert not torch.signbit(w[mask]).any()  # +0.0, not -0.0


@pytest.mark.skipif(importlib.util.find_spec("prune_callbacks.export.sparse_io") is None, reason="sparse_io not built")
def test_save_sparse_at_train_end(tmp_path):
    from prune_callbacks.export.sparse_io import load_sparse

    cbs = make_callbacks(**CONFIG, save_sparse_to=str(tmp_path / "sparse"))
    trainer = build(tmp_path / "out", cbs, save_strategy="no", max_steps=7)
    trainer.train()
    loaded = load_sparse(str(tmp_path / "sparse"))
    ours, theirs = state_of(trainer.model), state_of(loaded)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


def test_resume_from_a_checkpoint_in_another_runs_output_dir(tmp_path):
    """The record in trainer_state.json says where the state is: no resume_from= needed."""
    first = build(tmp_path / "a", [*make_callbacks(**CONFIG), StopAt(4)])
    first.train()
    state = json.loads((tmp_path / "a" / "checkpoint-4" / "trainer_state.json").read_text())
    record = state["stateful_callbacks"]["PruningStateRecord"]["attributes"]["record"]
    assert record["global_step"] == 4 and record["state_file"] == str((tmp_path / "a" / "checkpoint-4" / STATE_FILE).resolve())
    cbs = make_callbacks(**CONFIG)
    trainer = build(tmp_path / "b", cbs)  # a new output_dir holding no checkpoint-4
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    assert cbs.engine.resumed_from == record["state_file"] and cbs.pruner.step == 8
    assert cbs.pruner.mask_updates == 7
    # its own checkpoint-8 records its own state file
    again = json.loads((tmp_path / "b" / "checkpoint-8" / "trainer_state.json").read_text())
    assert again["stateful_callbacks"]["PruningStateRecord"]["attributes"]["record"]["state_file"].startswith(
        str((tmp_path / "b").resolve()))


def test_restore_callback_states_keeps_the_engine(tmp_path):
    """With restore_callback_states_from_checkpoint the Trainer swaps the record for a fresh one; resume still works."""
    build(tmp_path / "a", [*make_callbacks(**CONFIG), StopAt(4)]).train()
    cbs = make_callbacks(**CONFIG)
    trainer = build(tmp_path / "b", cbs, restore_callback_states_from_checkpoint=True)
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    assert cbs.pruner.step == 8 and cbs.engine.resumed_from.endswith(f"checkpoint-4/{STATE_FILE}")
    [record] = [cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == "PruningStateRecord"]
    assert record is not cbs[-1] and record.engine is cbs.engine  # the fresh one found the engine via the model
    saved = json.loads((tmp_path / "b" / "checkpoint-8" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["PruningStateRecord"]["attributes"]["record"]["global_step"] == 8


def test_pruning_starts_fresh_from_a_dense_checkpoint(tmp_path, caplog):
    """A checkpoint of a run without our callbacks: pruning starts at the resumed step, with a log line."""
    dense = build(tmp_path / "dense", [StopAt(3)], save_steps=3)
    dense.train()
    assert not (tmp_path / "dense" / "checkpoint-3" / STATE_FILE).exists()
    cbs = make_callbacks(final_sparsity=0.6, start_step=1, end_step=7, update_every=2)
    trainer = build(tmp_path / "pruned", cbs, save_steps=3)
    with caplog.at_level(logging.WARNING, logger="prune_callbacks"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "dense" / "checkpoint-3"))
    assert "holds no pruning state" in caplog.text and "starts fresh from this step" in caplog.text
    assert cbs.engine.started_fresh_at == 3
    pruner = cbs.pruner
    assert pruner.step == trainer.state.global_step == 8 and pruner.mask_updates == 2  # steps 5 and 7 (= end)
    assert pruner.report()["global_sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert (tmp_path / "pruned" / "checkpoint-6" / STATE_FILE).is_file()  # the save after resume works

    # a checkpoint whose weights were pruned but whose state is gone is refused
    first = build(tmp_path / "cut", [*make_callbacks(**CONFIG), StopAt(4)])
    first.train()
    os.remove(tmp_path / "cut" / "checkpoint-4" / STATE_FILE)
    (tmp_path / "cut" / "checkpoint-4" / "trainer_state.json").write_text(json.dumps(
        {**json.loads((tmp_path / "cut" / "checkpoint-4" / "trainer_state.json").read_text()), "stateful_callbacks": {}}))
    with pytest.raises(RuntimeError, match=r"without a pruning state, but the loaded model was pruned before"):
        build(tmp_path / "cut2", make_callbacks(**CONFIG)).train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-4"))


@pytest.mark.parametrize("finalize", [True, False])
def test_load_best_model_at_end_ends_with_the_final_masks(tmp_path, caplog, finalize):
    """The best checkpoint (step 4) was lightly pruned: the final masks are applied to its weights, figures match."""
    calls = []

    def later_is_worse(pred):
        calls.append(1)
        return {"score": float(len(calls))}

    cbs = make_callbacks(**CONFIG, finalize=finalize)
    trainer = build(tmp_path / "out", cbs, eval_rows=toy_classification_rows(8), eval_strategy="steps", eval_steps=4,
                    load_best_model_at_end=True, metric_for_best_model="score", greater_is_better=False)
    trainer.compute_metrics = later_is_worse
    with caplog.at_level(logging.WARNING, logger="prune_callbacks"):
        trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-4")
    best = load_state_file(os.path.join(trainer.state.best_model_checkpoint, STATE_FILE))
    assert best["mask_sparsity"] < 0.6
    assert "load_best_model_at_end loaded" in caplog.text and "final masks (sparsity 0.6000)" in caplog.text
    best_weights = load_file(os.path.join(trainer.state.best_model_checkpoint, "model.safetensors"))
    pruner = cbs.pruner
    assert pruner.finalized is finalize and pruner.mask_sparsity == 0.6
    for target, mask in zip(pruner.targets, pruner.pruned):
        w = target.param.detach()
        assert int((w == 0).sum()) == int(mask.sum())  # exactly the final masks
        assert torch.equal(w[~mask], best_weights[target.param_name][~mask])  # the best checkpoint's weights
    trainer.save_model(str(tmp_path / "final"))
    saved = load_file(str(tmp_path / "final" / "model.safetensors"))
    zeros = sum(int((saved[t.param_name] == 0).sum()) for t in pruner.targets)
    assert zeros / pruner.report()["prunable_params"] == pytest.approx(0.6, abs=1e-3)
    assert trainer.state.log_history[-1]["sparsity/global"] == pytest.approx(0.6, abs=1e-3)
