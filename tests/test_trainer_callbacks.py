"""Trainer callbacks on a stock transformers.Trainer: events, schedule, logs, precision, errors."""

import copy
import glob
import importlib.util
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from helpers import tiny_bert_classifier, toy_classification_rows  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from prune_callbacks import PruningConfig, PruningConfigError, target_sparsity  # noqa: E402
from prune_callbacks.integrations.trainer import (  # noqa: E402
    GradualPruningCallback,
    L1RegularizationCallback,
    PermanentMaskCallback,
    make_callbacks,
)


def build(tmp_path, callbacks, *, model=None, rows=None, eval_rows=None, compute_metrics=None, bind=True, **overrides):
    kwargs = dict(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                  max_steps=8, per_device_train_batch_size=8, disable_tqdm=True, seed=0)
    kwargs.update(overrides)
    trainer = Trainer(model=model if model is not None else tiny_bert_classifier(), args=TrainingArguments(**kwargs),
                      train_dataset=rows if rows is not None else toy_classification_rows(64), eval_dataset=eval_rows,
                      compute_metrics=compute_metrics, callbacks=callbacks)
    trainer.model_accepts_loss_kwargs = False
    if bind:
        for cb in callbacks:
            if hasattr(cb, "bind"):
                cb.bind(trainer)
    return trainer


def train_logs(trainer):
    return [e for e in trainer.state.log_history if "loss" in e]


def assert_masked_zero(pruner):
    for param, pruned in zip(pruner.params, pruner.pruned):
        assert torch.all(param[pruned] == 0)


class Recorder(TrainerCallback):
    """Checks, at every event, where the pruner's step counter stands against the Trainer's."""

    def __init__(self, callbacks):
        self.callbacks, self.events = callbacks, []

    def on_train_begin(self, args, state, control, **kw):
        self.events.append("train_begin")
        assert self.callbacks.pruner is not None and self.callbacks.pruner.step == 0

    def on_epoch_begin(self, args, state, control, **kw):
        self.events.append("epoch_begin")

    def on_step_begin(self, args, state, control, **kw):
        self.events.append("step_begin")
        assert self.callbacks.pruner.step == state.global_step

    def on_substep_end(self, args, state, control, **kw):
        self.events.append("substep_end")
        assert self.callbacks.pruner.step == state.global_step  # a micro-step is no step

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.events.append("pre_optimizer_step")
        assert self.callbacks.pruner.step == state.global_step
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in self.callbacks.pruner.params)

    def on_optimizer_step(self, args, state, control, **kw):
        self.events.append("optimizer_step")
        pruner = self.callbacks.pruner
        assert pruner.step == state.global_step + 1  # pruned inside optimizer.step(), before the Trainer counts it
        assert_masked_zero(pruner)

    def on_step_end(self, args, state, control, **kw):
        self.events.append("step_end")
        pruner = self.callbacks.pruner
        assert pruner.step == state.global_step
        assert pruner.mask_sparsity == pytest.approx(pruner.scheduled_sparsity())  # update_every=1
        assert_masked_zero(pruner)


def test_events_and_gradient_accumulation_count_optimizer_steps(tmp_path):
    cbs = make_callbacks(final_sparsity=0.5, start_step=1, end_step=5, update_every=1)
    recorder = Recorder(cbs)
    trainer = build(tmp_path, [*cbs, recorder], max_steps=6, gradient_accumulation_steps=2, per_device_train_batch_size=4)
    trainer.train()
    per_step = ["step_begin", "substep_end", "pre_optimizer_step", "optimizer_step", "step_end"]
    assert recorder.events == ["train_begin", "epoch_begin"] + per_step * 6
    pruner = cbs.pruner
    assert pruner.step == 6 and trainer.state.global_step == 6
    assert pruner.mask_updates == 5  # steps 1..5
    assert pruner.finalized and pruner.report()["global_sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_fractional_schedule_resolves_from_max_steps_and_lands_in_log_history(tmp_path):
    cbs = make_callbacks(final_sparsity=0.8, start_step=0.2, end_step=0.8, update_every=2, schedule="cubic")
    trainer = build(tmp_path, cbs, max_steps=10)
    trainer.train()
    steps = cbs.pruner.steps
    assert (steps.start_step, steps.end_step) == (2, 8)
    logs = {e["step"]: e for e in train_logs(trainer)}
    assert sorted(logs) == list(range(1, 11))
    # hand values of 0.8 * (1 - (1 - (t - 2) / 6) ** 3)
    expected_target = {1: 0.0, 2: 0.0, 4: 0.8 * (1 - (2 / 3) ** 3), 6: 0.8 * (1 - (1 / 3) ** 3), 8: 0.8, 10: 0.8}
    for t, value in expected_target.items():
        assert logs[t]["sparsity/scheduled"] == pytest.approx(value, abs=1e-9)
    n = cbs.pruner.report()["prunable_params"]
    for t, entry in logs.items():
        assert entry["sparsity/scheduled"] == pytest.approx(target_sparsity(t, initial=0.0, final=0.8, start=2, end=8))
        last_update = max([u for u in (2, 4, 6, 8) if u <= t], default=None)
        held = 0.0 if last_update is None else expected_target[last_update]
        assert entry["sparsity/global"] == pytest.approx(held, abs=1.0 / n)
        assert entry["sparsity/masks_target"] == pytest.approx(held, abs=1e-12)  # what the masks were computed for
        assert entry["pruning/mask_updates"] == len([u for u in (2, 4, 6, 8) if u <= t])
        groups = [k for k in entry if k.startswith("sparsity/")
                  and k not in ("sparsity/global", "sparsity/scheduled", "sparsity/masks_target")]
        assert {g.split("/", 1)[1] for g in groups} == {"attention.self.query", "attention.self.key", "attention.self.value",
                                                        "attention.output.dense", "intermediate.dense", "output.dense"}
    final = trainer.state.log_history[-1]
    assert "train_runtime" in final and final["sparsity/global"] == pytest.approx(0.8, abs=1.0 / n)
    assert list(final).index("train_runtime") < list(final).index("sparsity/global")  # placed, not returned


def test_figures_reach_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers.integrations import TensorBoardCallback

    cbs = make_callbacks(final_sparsity=0.5, start_step=1, end_step=4, update_every=1)
    trainer = build(tmp_path, cbs, max_steps=6, logging_steps=2, report_to=["tensorboard"])
    names = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
    assert names.index("GradualPruningCallback") < names.index("TensorBoardCallback")
    trainer.train()
    [event_file] = glob.glob(str(tmp_path / "out" / "runs" / "**" / "events.out.tfevents*"), recursive=True)
    acc = EventAccumulator(event_file)
    acc.Reload()
    tb = {e.step: e.value for e in acc.Scalars("train/sparsity/global")}
    history = {e["step"]: e["sparsity/global"] for e in train_logs(trainer)}
    assert sorted(tb) == sorted(history) == [2, 4, 6]
    for step, value in history.items():
        assert tb[step] == pytest.approx(value, rel=1e-6)
    assert tb[6] == pytest.approx(0.5, abs=1e-3)
    assert "train/sparsity/attention.self.query" in acc.Tags()["scalars"]
    assert any(isinstance(cb, TensorBoardCallback) for cb in trainer.callback_handler.callbacks)


@pytest.mark.parametrize("precision, max_grad_norm", [("bf16", 1.0), ("fp32", 0.0)])
def test_bf16_and_no_clipping(tmp_path, precision, max_grad_norm):
    cbs = make_callbacks(final_sparsity=0.7, start_step=1, end_step=4, update_every=1, finalize=False)
    trainer = build(tmp_path, cbs, max_steps=5, bf16=precision == "bf16", max_grad_norm=max_grad_norm)
    if precision == "bf16":
        assert trainer.accelerator.mixed_precision == "bf16"
    trainer.train()
    pruner = cbs.pruner
    assert pruner.step == 5 and pruner.skipped_steps == 0
    assert pruner.report()["global_sparsity"] == pytest.approx(0.7, abs=1e-3)
    assert_masked_zero(pruner)
    assert all(torch.isfinite(b).all() and b.abs().sum() > 0 for b in pruner.saliency.buffers["importance"])


def test_bad_config_fails_at_train_begin_before_any_forward(tmp_path):
    forwards = []

    def run(**config):
        model = tiny_bert_classifier()
        model.register_forward_hook(lambda *a: forwards.append(1))
        trainer = build(tmp_path, make_callbacks(**config), model=model, max_steps=8)
        trainer.train()

    with pytest.raises(PruningConfigError, match=r"end_step=20 resolves to step 20, beyond the run's 8 optimizer steps"):
        run(end_step=20, start_step=2)
    with pytest.raises(PruningConfigError, match=r"include pattern 'no_such_layer' matches no module"):
        run(include=["no_such_layer"])
    assert forwards == []


def test_recipe_path(tmp_path):
    section = tmp_path / "recipe.yaml"
    section.write_text("model: {name: x}\npruning:\n  final_sparsity: 0.5\n  start_step: 2\n  end_step: 6\n")
    flat = tmp_path / "flat.yaml"
    flat.write_text("final_sparsity: 0.3\nsaliency: magnitude\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pruning:\n  final_sparsity: 0.5\n  bogus: 1\n")
    cfg = make_callbacks(str(section)).engine.config
    assert (cfg.final_sparsity, cfg.start_step, cfg.end_step) == (0.5, 2, 6)
    cfg = GradualPruningCallback(flat, update_every=3).engine.config
    assert (cfg.final_sparsity, cfg.saliency, cfg.update_every) == (0.3, "magnitude", 3)
    with pytest.raises(PruningConfigError, match=r"bad\.yaml:3: pruning\.bogus: unknown key 'bogus'") as info:
        make_callbacks(bad)
    assert [path for path, _ in info.value.problems] == ["pruning.bogus"]  # the field path as data
    with pytest.raises(PruningConfigError, match=r"no such recipe file .*missing\.yaml"):
        make_callbacks(tmp_path / "missing.yaml")
    with pytest.raises(PruningConfigError, match=r"final_sparsity"):
        make_callbacks(PruningConfig(), final_sparsity=1.5)
    shipped = Path(__file__).parents[1] / "recipes" / "minilm-rt-90.yaml"
    if shipped.is_file():  # the repository's recipe: its pruning: section is a valid PruningConfig
        assert make_callbacks(shipped).engine.config.final_sparsity == 0.9


@pytest.mark.parametrize("text, problem", [
    ("pruning:\n  final_sparsity: 0.5\n  final_sparsity: 0.7\n", "duplicate key 'final_sparsity'"),
    ("pruning:\n  final_sparsity: [1\n", "not valid YAML"),
    ("pruning:\n  saliency: nope\n", "pruning.saliency"),
    ("pruning: 3\n", "must be a mapping of PruningConfig fields"),
])
def test_recipe_file_is_read_like_validate_reads_it(tmp_path, text, problem):
    """One YAML reader: make_callbacks refuses what `prune-callbacks validate` refuses, with its messages."""
    from prune_callbacks.recipe.errors import RecipeError
    from prune_callbacks.recipe.yaml_reading import read_yaml

    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(PruningConfigError, match=problem):
        make_callbacks(path)
    if "YAML" in problem or "duplicate" in problem:
        with pytest.raises(RecipeError, match=problem):
            read_yaml(path)


def test_a_list_of_configs_reaches_the_pruner(tmp_path):
    """make_callbacks([a, b]) and a recipe's ``pruning:`` list give the Pruner the list as it is."""
    a = PruningConfig(final_sparsity=0.5, include=["attention"], start_step=1, end_step=3, update_every=1)
    b = PruningConfig(final_sparsity=0.3, include=["intermediate"], start_step=1, end_step=3, update_every=1)
    path = tmp_path / "two.yaml"
    path.write_text("pruning:\n  - {final_sparsity: 0.5, include: [attention]}\n  - {final_sparsity: 0.3, bogus: 1}\n")
    with pytest.raises(PruningConfigError, match=r"pruning\.1\.bogus: unknown key") as info:
        make_callbacks(path)
    assert [p for p, _ in info.value.problems] == ["pruning.1.bogus"]
    with pytest.raises(PruningConfigError, match="apply to one config"):
        make_callbacks([a, b], final_sparsity=0.2)
    cbs = make_callbacks([a, b])
    assert cbs.engine.config == [a, b]
    build(tmp_path, cbs, max_steps=4).train()
    groups = cbs.pruner.report()["groups"]
    assert [g["mask_sparsity"] for g in groups] == [0.5, 0.3]


def _accuracy(pred):
    return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}


def test_evaluate_dense_logs_the_unpruned_model(tmp_path):
    model = tiny_bert_classifier()
    dense = copy.deepcopy(model).eval()
    eval_rows = toy_classification_rows(16, seed=1)
    with torch.no_grad():
        batch = {k: torch.tensor([r[k] for r in eval_rows]) for k in eval_rows[0]}
        losses = [dense(**{k: v[i:i + 8] for k, v in batch.items()}).loss for i in (0, 8)]
    cbs = make_callbacks(final_sparsity=0.8, start_step=1, end_step=3, update_every=1, evaluate_dense=True)
    trainer = build(tmp_path, cbs, model=model, eval_rows=eval_rows, compute_metrics=_accuracy, max_steps=4,
                    per_device_eval_batch_size=8)
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["step"] == 0 and first["sparsity/global"] == 0.0
    assert first["dense_loss"] == pytest.approx(float(sum(losses) / 2), abs=1e-5)
    assert "dense_accuracy" in first
    pruned = trainer.evaluate()
    assert "eval_accuracy" in pruned and pruned["eval_loss"] != pytest.approx(first["dense_loss"], abs=1e-6)

    no_eval = build(tmp_path, make_callbacks(evaluate_dense=True), max_steps=4)
    with pytest.raises(ValueError, match="evaluate_dense=True needs an eval_dataset"):
        no_eval.train()


def test_l1_without_pruning(tmp_path):
    l1 = L1RegularizationCallback(l1_lambda=200.0, l1_ramp_steps=2)
    trainer = build(tmp_path, [l1], max_steps=6, learning_rate=1e-4)
    trainer.train()
    pruner = l1.engine.pruner
    assert pruner.mask_sparsity == 0.0 and not any(m.any() for m in pruner.pruned)
    logs = train_logs(trainer)
    assert logs[0]["l1/strength"] == pytest.approx(100.0) and logs[-1]["l1/strength"] == pytest.approx(200.0)
    assert logs[-1]["l1/zero_fraction"] > 0.3
    assert logs[-1]["l1/zero_fraction"] > logs[0]["l1/zero_fraction"]
    assert "sparsity/global" not in logs[-1]
    zeros = sum(int((p == 0).sum()) for p in pruner.params) / sum(p.numel() for p in pruner.params)
    assert zeros == pytest.approx(logs[-1]["l1/zero_fraction"])


def test_l1_in_a_set_shares_the_engine(tmp_path):
    cbs = make_callbacks(final_sparsity=0.5, start_step=1, end_step=3, update_every=1, l1_lambda=1.0)
    assert [type(c).__name__ for c in cbs] == ["GradualPruningCallback", "L1RegularizationCallback", "PermanentMaskCallback",
                                       "PruningStateRecord"]
    assert len({id(c.engine) for c in cbs}) == 1
    trainer = build(tmp_path, cbs, max_steps=4)
    trainer.train()
    assert {"l1/strength", "sparsity/global"} <= set(train_logs(trainer)[-1])


def test_individual_callbacks_work_together_and_refuse_two_engines(tmp_path):
    gradual = GradualPruningCallback(final_sparsity=0.5, start_step=1, end_step=3, update_every=1)
    permanent = PermanentMaskCallback()
    trainer = build(tmp_path, [gradual, permanent], max_steps=4)
    trainer.train()
    assert gradual.pruner.finalized and gradual.pruner.report()["global_sparsity"] == pytest.approx(0.5, abs=1e-3)

    both = build(tmp_path, [GradualPruningCallback(start_step=1, end_step=3), L1RegularizationCallback(1.0)], max_steps=4)
    with pytest.raises(RuntimeError, match="two prune_callbacks engines"):
        both.train()


def test_integrations_package_does_not_import_transformers():
    code = "import sys, prune_callbacks.integrations; assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_group_names_stay_distinct():
    from prune_callbacks.core.figures import short_group_names

    groups = {"encoder.block.*.layer.*.q": 1, "decoder.block.*.layer.*.q": 2, "model.layers.*.mlp.up_proj": 3}
    assert short_group_names(groups) == {"encoder.block.*.layer.*.q": 1, "decoder.block.*.layer.*.q": 2, "mlp.up_proj": 3}


class Reporter(TrainerCallback):
    """Stands for a reporting integration: it only reads the logs it is handed."""

    def __init__(self):
        self.seen = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs))


def test_bind_adds_the_callbacks_and_runs_them_before_reporters(tmp_path):
    reporter = Reporter()
    trainer = build(tmp_path, [reporter], max_steps=3)
    cbs = make_callbacks(final_sparsity=0.5, start_step=1, end_step=2, update_every=1)
    assert cbs.bind(trainer) is cbs  # adds them (after __init__) and orders them
    cbs.bind(trainer)  # idempotent
    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert names[:3] == ["DefaultFlowCallback", "GradualPruningCallback", "PermanentMaskCallback"]
    assert names.count("GradualPruningCallback") == 1 and names.index("Reporter") > 2
    assert "PruningStateRecord" in names
    trainer.train()
    assert [e["sparsity/global"] for e in reporter.seen if "loss" in e] == [pytest.approx(0.0), pytest.approx(0.5, abs=1e-3),
                                                                             pytest.approx(0.5, abs=1e-3)]
    assert cbs[0].trainer is trainer


def test_unbound_callbacks_still_fill_log_history_and_say_what_reporters_miss(tmp_path, caplog):
    reporter = Reporter()
    cbs = make_callbacks(final_sparsity=0.5, start_step=1, end_step=2, update_every=1)
    trainer = build(tmp_path, [reporter, *cbs], max_steps=2, bind=False, report_to=["tensorboard"]
                    if importlib.util.find_spec("tensorboard") else [])
    with caplog.at_level(logging.WARNING, logger="prune_callbacks"):
        trainer.train()
    assert cbs[0].trainer is None
    assert all("sparsity/global" not in e for e in reporter.seen)  # it ran before ours
    assert [e["sparsity/global"] for e in train_logs(trainer)] == [0.0, pytest.approx(0.5, abs=1e-3)]
    if importlib.util.find_spec("tensorboard"):
        assert "not bound to their Trainer" in caplog.text


class DenseSpy(TrainerCallback):
    """At every evaluation: the step, the metric prefix, the mask updates so far, whether every target is nonzero."""

    def __init__(self, callbacks):
        self.callbacks, self.seen = callbacks, []

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        pruner = self.callbacks.pruner
        prefix = next(k for k in metrics if k.endswith("_loss")).rsplit("_", 1)[0]
        dense = all(int(p.count_nonzero()) == p.numel() for p in pruner.params)
        self.seen.append((state.global_step, prefix, pruner.step, pruner.mask_updates, dense))


def test_evaluate_dense_before_pruning_runs_after_the_last_dense_step(tmp_path):
    cbs = make_callbacks(final_sparsity=0.6, start_step=4, end_step=5, update_every=1, evaluate_dense="before_pruning")
    spy = DenseSpy(cbs)
    trainer = build(tmp_path, [*cbs, spy], eval_rows=toy_classification_rows(16, seed=1), compute_metrics=_accuracy,
                    max_steps=6, eval_strategy="steps", eval_steps=3)
    trainer.train()
    # once, after step 3 (masks first computed in step 4), every target weight still nonzero; the Trainer's own
    # evaluation and loss log of step 3 still happen
    assert spy.seen == [(3, "dense", 3, 0, True), (3, "eval", 3, 0, True), (6, "eval", 6, 2, False)]
    [dense] = [e for e in trainer.state.log_history if "dense_loss" in e]
    assert dense["step"] == dense["dense_step"] == 3 and "dense_accuracy" in dense
    assert dense["sparsity/global"] == 0.0
    assert [e["step"] for e in train_logs(trainer)] == [1, 2, 3, 4, 5, 6]
    assert cbs.pruner.report()["global_sparsity"] == pytest.approx(0.6, abs=1e-3)

    # True is "train_begin": before any step, dense_step 0; pruning from step 1 -> "before_pruning" is at train begin too
    for value, start in ((True, 4), ("train_begin", 4), ("before_pruning", 1)):
        cbs = make_callbacks(final_sparsity=0.5, start_step=start, end_step=5, update_every=1, evaluate_dense=value)
        spy = DenseSpy(cbs)
        build(tmp_path, [*cbs, spy], eval_rows=toy_classification_rows(16, seed=1), max_steps=6).train()
        assert spy.seen == [(0, "dense", 0, 0, True)], value

    # start_step=0: the first update is at step update_every (3), so the dense model is the one after step 2
    cbs = make_callbacks(final_sparsity=0.5, start_step=0, end_step=6, update_every=3, evaluate_dense="before_pruning")
    assert cbs.pruner is None
    spy = DenseSpy(cbs)
    build(tmp_path, [*cbs, spy], eval_rows=toy_classification_rows(16, seed=1), max_steps=6).train()
    assert spy.seen == [(2, "dense", 2, 0, True)]


def test_evaluate_dense_before_pruning_on_resume(tmp_path):
    def run(resume=None):
        cbs = make_callbacks(final_sparsity=0.5, start_step=4, end_step=5, update_every=1, evaluate_dense="before_pruning")
        spy = DenseSpy(cbs)
        trainer = build(tmp_path, [*cbs, spy], eval_rows=toy_classification_rows(16, seed=1), max_steps=6,
                        save_strategy="steps", save_steps=2)
        trainer.train(resume_from_checkpoint=resume)
        return spy.seen

    assert run() == [(3, "dense", 3, 0, True)]
    checkpoints = tmp_path / "out"
    assert run(str(checkpoints / "checkpoint-2")) == [(3, "dense", 3, 0, True)]  # still ahead: evaluated
    assert run(str(checkpoints / "checkpoint-4")) == []  # past the first mask update: skipped


@pytest.mark.parametrize("value", ["before-pruning", "always", 1, "true"])
def test_evaluate_dense_rejects_unknown_values(value):
    with pytest.raises(PruningConfigError, match=r"evaluate_dense=.* is invalid; allowed: False, True .*'before_pruning'"):
        make_callbacks(evaluate_dense=value)
    with pytest.raises(PruningConfigError, match=r"evaluate_dense="):
        GradualPruningCallback(evaluate_dense=value)


def test_fsdp_sharded_model_refused_at_train_begin_with_the_reason():
    """The Trainer's fsdp arguments shard the model through Accelerate's FSDP plugin, which Accelerate 1.16 enables
    only on GPU backends (on CPU the Trainer runs DDP); a sharded model reaching the callbacks is refused."""
    from types import SimpleNamespace

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from prune_callbacks.integrations.trainer.engine import TrainerPruningEngine

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = tiny_bert_classifier()
        for layer in model.bert.encoder.layer:
            fully_shard(layer)
        fully_shard(model)  # what the Trainer's accelerator would do with fsdp_version 2 on GPUs
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        engine = TrainerPruningEngine(PruningConfig(start_step=1, end_step=4))
        with pytest.raises(NotImplementedError, match=r"fsdp arguments.*never for MULTI_CPU.*fully_shard"):
            engine.start(None, SimpleNamespace(max_steps=8, global_step=0), model, opt)
        assert engine.pruner is None and not opt._optimizer_step_pre_hooks
    finally:
        dist.destroy_process_group()


def test_recovery_lr_scale_rides_the_trainers_optimizer(tmp_path):
    """PruningConfig.recovery_lr_scale through make_callbacks: the optimizer steps at the Trainer's scheduled rate
    times the factor after the cut; the rate the Trainer logs is its scheduler's own, the factor is logged beside it
    (``pruning/lr_factor``; max_steps 8: cut after step 4, ramp 1 step)."""
    cbs = make_callbacks(PruningConfig(final_sparsity=0.5, schedule="oneshot", start_step=4, recovery_lr_scale=3.0))
    trainer = build(tmp_path, cbs, lr_scheduler_type="constant", learning_rate=1e-3)
    stepped = []

    class Spy(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kw):
            inner = optimizer.optimizer  # Accelerate's wrapper; the Pruner's hooks are on the torch optimizer
            inner.register_step_pre_hook(lambda o, a, k: stepped.append(o.param_groups[0]["lr"]))

    trainer.add_callback(Spy())
    trainer.train()
    assert stepped == pytest.approx([1e-3] * 4 + [3e-3] * 4)
    assert [e["learning_rate"] for e in train_logs(trainer)] == pytest.approx([1e-3] * 8)
    assert [e["pruning/lr_factor"] for e in train_logs(trainer)] == [1.0] * 4 + [3.0] * 4
