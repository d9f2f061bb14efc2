"""Trainer checkpoints hold the pruning state; resume is exact; the final model is plainly loadable."""

import importlib.util
import os
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from helpers import tiny_bert_classifier, toy_classification_rows  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForSequenceClassification, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from prune_callbacks.integrations.trainer import make_callbacks  # noqa: E402
from prune_callbacks.state_io import STATE_FILE, load_state_file  # noqa: E402

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
    with pytest.raises(RuntimeError, match=r"resumes at global step 4 but no pruning state"):
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


@pytest.mark.skipif(importlib.util.find_spec("prune_callbacks.sparse_io") is None, reason="sparse_io not built")
def test_save_sparse_at_train_end(tmp_path):
    from prune_callbacks.sparse_io import load_sparse

    cbs = make_callbacks(**CONFIG, save_sparse_to=str(tmp_path / "sparse"))
    trainer = build(tmp_path / "out", cbs, save_strategy="no", max_steps=7)
    trainer.train()
    loaded = load_sparse(str(tmp_path / "sparse"))
    ours, theirs = state_of(trainer.model), state_of(loaded)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


def test_load_best_model_at_end_keeps_the_best_checkpoints_masks(tmp_path):
    calls = []

    def later_is_worse(pred):
        calls.append(1)
        return {"score": float(len(calls))}

    cbs = make_callbacks(**CONFIG)
    trainer = build(tmp_path / "out", cbs, eval_rows=toy_classification_rows(8), eval_strategy="steps", eval_steps=4,
                    load_best_model_at_end=True, metric_for_best_model="score", greater_is_better=False)
    trainer.compute_metrics = later_is_worse
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-4")
    best = load_state_file(os.path.join(trainer.state.best_model_checkpoint, STATE_FILE))
    pruner = cbs.pruner
    assert pruner.finalized and pruner.mask_sparsity == best["mask_sparsity"] < 0.6
    for target, mask in zip(pruner.targets, pruner.pruned):
        assert torch.equal(mask, best["masks"][target.name])
        assert int((target.param == 0).sum()) == int(mask.sum())  # no later zeros added by finalize
