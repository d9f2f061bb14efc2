"""Issue 29, recipe / CLI / Trainer side: every check that can run before compute does (in ``validate`` and
``finetune`` alike), damaged files and failed saves are named, signals end cleanly and say what is true,
and what the Trainer integration reports (guard verdict, model card, slimming) reaches the user.
Tiny local BERT + CSV (tests/recipe_fixtures.py); each test runs in seconds."""

from __future__ import annotations

import errno
import logging
import os
import signal
from pathlib import Path

import pytest
import transformers

from prune_callbacks.cli import main
from prune_callbacks.recipe import RecipeError, load_recipe
from recipe_fixtures import tiny_recipe, write_recipe


def _run(capsys, argv) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return code, captured.err


def _no_training(monkeypatch):
    def train(self, *args, **kwargs):
        raise AssertionError("training started although a check could have refused the recipe before compute")

    monkeypatch.setattr(transformers.Trainer, "train", train)


# ------------------------------------------------------------------ 1. checks before compute, one code path
GUARD = {"metric": "eval_accuracy", "max_drop": 0.05, "every": 2, "patience": 2}


@pytest.mark.parametrize("metric", ["eval_f1", "eval_acc", "accuracy"])
def test_guard_metric_the_evaluation_does_not_produce_is_refused_by_validate_and_before_training(
        tmp_path, capsys, monkeypatch, metric):
    recipe = tiny_recipe(tmp_path, tmp_path / "out", training={"max_steps": 8},
                         pruning={"final_sparsity": 0.5, "start_step": 1, "end_step": 6, "update_every": 1,
                                  "accuracy_guard": {**GUARD, "metric": metric}})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    code, err = _run(capsys, ["validate", str(path)])
    assert code == 2, err
    assert "pruning.accuracy_guard.metric" in err and repr(metric) in err and "eval_accuracy" in err
    _no_training(monkeypatch)
    code, err_finetune = _run(capsys, ["finetune", str(path)])
    assert code == 2 and err_finetune.split("invalid recipe:", 1)[1] == err.split("invalid recipe:", 1)[1]
    assert not (tmp_path / "out").exists()


def test_guard_metric_named_in_evaluation_metrics_is_accepted(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, tmp_path / "out", training={"max_steps": 8},
                         evaluation={"metrics": ["accuracy", "f1"]},
                         pruning={"final_sparsity": 0.5, "start_step": 1, "end_step": 6, "update_every": 1,
                                  "accuracy_guard": {**GUARD, "metric": "eval_f1"}})
    code, err = _run(capsys, ["validate", str(write_recipe(tmp_path / "r.yaml", recipe))])
    assert code == 0, err


def _tiny_llama_dir(path: Path) -> Path:
    from helpers import tiny_llama_lm

    tiny_llama_lm(seed=0).save_pretrained(path)
    return path


def test_teacher_of_another_architecture_is_refused_by_validate_load_and_before_training(tmp_path, capsys, monkeypatch):
    teacher = _tiny_llama_dir(tmp_path / "llama")
    recipe = tiny_recipe(tmp_path, tmp_path / "out", distillation={"teacher": str(teacher)})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    code, err = _run(capsys, ["validate", str(path), "--load"])
    assert code == 2, err
    assert "distillation.teacher" in err and "llama" in err and "bert" in err
    _no_training(monkeypatch)
    code, err_finetune = _run(capsys, ["finetune", str(path)])
    assert code == 2 and err_finetune.split("invalid recipe:", 1)[1] == err.split("invalid recipe:", 1)[1]


# ------------------------------------------------------------------ 2. blocks without slimming
def test_blocks_without_slim_is_refused_with_reason_and_fix(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, tmp_path / "out", pruning={"granularity": "blocks", "final_sparsity": 0.5,
                                                               "start_step": 1, "end_step": 3})
    code, err = _run(capsys, ["validate", str(write_recipe(tmp_path / "r.yaml", recipe))])
    assert code == 2, err
    assert "output.slim" in err and "not an identity" in err and "output.slim: true" in err


# ------------------------------------------------------------------ 3. N:M unquoted
def test_unquoted_n_m_granularity_reads_as_the_string(tmp_path):
    recipe = tiny_recipe(tmp_path, tmp_path / "out")
    text = write_recipe(tmp_path / "r.yaml", recipe).read_text()
    path = tmp_path / "nm.yaml"
    path.write_text(text.replace("pruning:\n", "pruning:\n  granularity: 2:4\n", 1))
    assert "granularity: 2:4\n" in path.read_text()
    assert load_recipe(path).pruning.granularity == "2:4"
    plain = write_recipe(tmp_path / "p.yaml", recipe)
    assert load_recipe(plain, ["pruning.granularity=2:4"]).pruning.granularity == "2:4"


@pytest.mark.parametrize("text, value", [("1:30", "1:30"), ("190", 190), ("1_000", 1000), ("0x1f", 31), ("1.5", 1.5),
                                         ("1e3", "1e3"), ("1.0e+3", 1000.0)])
def test_yaml_numbers_are_yaml_1_2_without_sexagesimal(text, value):
    from prune_callbacks.recipe.yaml_reading import load_yaml_text

    assert load_yaml_text(f"k: {text}")["k"] == value


# ------------------------------------------------------------------ 4. report on a damaged folder
@pytest.fixture()
def finished_run(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, tmp_path / "out"))
    assert main(["finetune", str(path)]) == 0
    return tmp_path / "out"


def test_report_names_damaged_config_and_trainer_state(finished_run, capsys):
    (finished_run / "config.json").write_text("{not json")
    code, err = _run(capsys, ["report", str(finished_run)])
    assert code == 1 and "config.json" in err and "not valid JSON" in err
    checkpoint = sorted((finished_run / "checkpoints").iterdir())[-1]
    (checkpoint / "trainer_state.json").write_text("[1, 2")
    code, err = _run(capsys, ["report", str(checkpoint)])
    assert code == 1 and "trainer_state.json" in err and "not valid JSON" in err


# ------------------------------------------------------------------ 5. full disk during the final save
@pytest.mark.parametrize("where", ["weights", "report"])
def test_full_disk_at_the_final_save_keeps_the_checkpoints_and_says_where(tmp_path, capsys, monkeypatch, where):
    out = tmp_path / "out"
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, out))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "weights":
        original = transformers.PreTrainedModel.save_pretrained

        def save_pretrained(self, folder, *args, **kwargs):  # the checkpoints fit, the final model does not
            if Path(folder).name == ".staging":
                full()
            return original(self, folder, *args, **kwargs)

        monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", save_pretrained)
    else:
        from prune_callbacks.recipe import artifacts

        monkeypatch.setattr(artifacts, "write_json", full)
    code, err = _run(capsys, ["finetune", str(path)])
    assert code == 1, err
    assert "No space left on device" in err and "checkpoint-4" in err and "--resume" in err
    assert len([line for line in err.splitlines() if line.startswith("prune-callbacks")]) == 1
    assert (out / "checkpoints" / "checkpoint-4" / "pruning_state.safetensors").is_file()
    assert (out / ".incomplete-run").is_file()
    monkeypatch.undo()  # space freed: --resume redoes the final evaluation and save from the last checkpoint
    code, err = _run(capsys, ["finetune", str(path), "--resume"])
    assert code == 0, err
    assert (out / "model.safetensors").is_file() and (out / "report.json").is_file()


# ------------------------------------------------------------------ 6. SIGTERM and SIGINT
def _signal_at_step(monkeypatch, step: int, signum: int) -> None:
    original = transformers.Trainer.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step + 1 >= step:
            os.kill(os.getpid(), signum)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "training_step", training_step)


def test_sigterm_is_handled_like_ctrl_c(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, out))
    before = signal.getsignal(signal.SIGTERM)
    _signal_at_step(monkeypatch, 4, signal.SIGTERM)
    code, err = _run(capsys, ["finetune", str(path)])
    assert code == 143, err
    assert "terminated" in err and "--resume" in err and "checkpoint-2" in err
    assert signal.getsignal(signal.SIGTERM) == before
    assert not (out / ".staging").exists() and (out / ".incomplete-run").is_file()


def test_sigterm_from_outside_exits_143_with_one_message(tmp_path):
    import subprocess
    import sys

    tests = Path(__file__).resolve().parent
    out = tmp_path / "out"
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, out))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(tests / "lifecycle_kill_script.py"), "sigterm:4", str(path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "terminated (SIGTERM)" in proc.stderr and "checkpoint-2" in proc.stderr and "--resume" in proc.stderr
    assert main(["finetune", str(path), "--resume"]) == 0


def test_ctrl_c_without_checkpoints_says_nothing_is_kept(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, out, training={"save_strategy": "no"}))
    _signal_at_step(monkeypatch, 2, signal.SIGINT)
    code, err = _run(capsys, ["finetune", str(path)])
    assert code == 130, err
    assert "--resume" not in err and "nothing to resume" in err
    assert not out.exists()


# ------------------------------------------------------------------ 7. resume from a damaged state
def _interrupted_run(tmp_path, monkeypatch, capsys) -> tuple[Path, Path]:
    out = tmp_path / "out"
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, out))
    _signal_at_step(monkeypatch, 4, signal.SIGINT)
    assert main(["finetune", str(path)]) == 130
    monkeypatch.undo()
    capsys.readouterr()
    return path, out


def test_resume_from_a_truncated_pruning_state_gives_the_remedy(tmp_path, capsys, monkeypatch):
    path, out = _interrupted_run(tmp_path, monkeypatch, capsys)
    state = out / "checkpoints" / "checkpoint-2" / "pruning_state.safetensors"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    for command in (["validate", str(path), "--resume"], ["finetune", str(path), "--resume"]):
        code, err = _run(capsys, command)
        assert code == 1, err
        assert str(state) in err and "damaged" in err and "checkpoint-2" in err and "delete" in err.lower()


def test_resume_falling_back_to_the_recorded_state_file_says_which(tmp_path, caplog):
    import shutil

    from transformers import Trainer, TrainingArguments

    from helpers import tiny_bert_classifier, toy_classification_rows
    from prune_callbacks.integrations.trainer import make_callbacks

    rows = toy_classification_rows(32)
    config = {"final_sparsity": 0.5, "start_step": 1, "end_step": 4, "saliency": "magnitude"}

    def trainer_in(folder, steps):
        args = TrainingArguments(output_dir=str(folder), max_steps=steps, per_device_train_batch_size=8,
                                 save_strategy="steps", save_steps=2, report_to="none", use_cpu=True,
                                 disable_tqdm=True, logging_steps=1)
        callbacks = make_callbacks(config)
        trainer = Trainer(model=tiny_bert_classifier(seed=0), args=args, train_dataset=rows, callbacks=callbacks)
        callbacks.bind(trainer)
        return trainer

    trainer_in(tmp_path / "a", 4).train()
    recorded = (tmp_path / "a" / "checkpoint-2" / "pruning_state.safetensors").resolve()
    copy = tmp_path / "b" / "checkpoint-2"
    shutil.copytree(tmp_path / "a" / "checkpoint-2", copy)
    (copy / "pruning_state.safetensors").unlink()  # copied without its state: the record's absolute path is used
    with caplog.at_level(logging.WARNING, logger="prune_callbacks"):
        trainer_in(tmp_path / "b", 4).train(resume_from_checkpoint=str(copy))
    assert str(recorded) in caplog.text and "recorded" in caplog.text


# ------------------------------------------------------------------ 8.-10. Trainer: guard, model card
def _guarded_trainer(tmp_path, callbacks_config, **args):
    from transformers import Trainer, TrainingArguments

    from helpers import tiny_bert_classifier, toy_classification_rows
    from prune_callbacks.integrations.trainer import make_callbacks

    rows = toy_classification_rows(32)
    defaults = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, logging_steps=1, report_to="none",
                    use_cpu=True, disable_tqdm=True)
    callbacks = make_callbacks(callbacks_config)
    trainer = Trainer(model=tiny_bert_classifier(seed=0), args=TrainingArguments(**{**defaults, **args}),
                      train_dataset=rows, eval_dataset=rows[:8], callbacks=callbacks)
    callbacks.bind(trainer)
    return trainer


def test_guard_evaluations_do_not_change_the_best_model(tmp_path):
    config = {"final_sparsity": 0.5, "start_step": 1, "end_step": 10, "update_every": 1, "saliency": "magnitude",
              "accuracy_guard": {"metric": "eval_loss", "max_drop": 10.0, "every": 1}}
    trainer = _guarded_trainer(tmp_path, config, max_steps=12, eval_strategy="steps", eval_steps=4,
                               save_strategy="steps", save_steps=4, load_best_model_at_end=True,
                               metric_for_best_model="loss", greater_is_better=False)
    trainer.train()
    state = trainer.state
    assert state.best_global_step in (4, 8, 12), state.best_global_step
    assert state.best_model_checkpoint is not None
    assert state.best_model_checkpoint.endswith(f"checkpoint-{state.best_global_step}")
    guard = trainer.callback_handler.callbacks
    trajectory = next(cb for cb in guard if type(cb).__name__ == "AccuracyGuardCallback").guards[0].trajectory
    assert len(trajectory) > 6  # the guard did evaluate at every step once masks existed


def test_guard_verdict_is_a_warning_when_not_met(tmp_path, capsys, caplog):
    recipe = tiny_recipe(tmp_path, tmp_path / "out", training={"max_steps": 8},
                         pruning={"final_sparsity": 0.95, "start_step": 1, "end_step": 6, "update_every": 1,
                                  "accuracy_guard": {**GUARD, "max_drop": 0.0, "mode": "min", "metric": "eval_loss",
                                                     "every": 2}})
    with caplog.at_level(logging.WARNING):
        code, err = _run(capsys, ["finetune", str(write_recipe(tmp_path / "r.yaml", recipe))])
    assert code == 0, err
    records = [r for r in caplog.records if "accuracy guard" in r.getMessage()]
    assert records and records[-1].levelno >= logging.WARNING
    message = records[-1].getMessage()
    assert "eval_loss" in message and "dense" in message


def test_guard_verdict_not_met_is_a_python_warning_too(caplog):
    from prune_callbacks.core.guard_config import AccuracyGuardConfig
    from prune_callbacks.integrations.guard_verdict import AccuracyGuardWarning, tell_verdict

    config = AccuracyGuardConfig(metric="eval_accuracy", max_drop=0.01)
    with pytest.warns(AccuracyGuardWarning, match="eval_accuracy 0.7000 at 50.0% sparsity, dense 0.8000.*NOT met"):
        tell_verdict(config, {"metric": 0.7, "sparsity": 0.5, "baseline": 0.8, "met": False})
    with caplog.at_level(logging.WARNING, logger="prune_callbacks"):
        tell_verdict(config, {"metric": 0.795, "sparsity": 0.5, "baseline": 0.8, "met": True})
    assert "eval_accuracy 0.7950 at 50.0% sparsity, dense 0.8000, allowed drop 0.01: met" in caplog.text


def test_model_card_does_not_list_pruning_figures_as_evaluation_results(tmp_path):
    import torch
    from transformers import Trainer, TrainingArguments
    from transformers.modelcard import parse_log_history

    from helpers import tiny_bert_classifier, toy_classification_rows
    from prune_callbacks.integrations.trainer import make_callbacks

    model = tiny_bert_classifier(seed=0)
    rows = toy_classification_rows(32)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8, logging_steps=1,
                             eval_strategy="steps", eval_steps=3, report_to="none", use_cpu=True, save_strategy="no",
                             disable_tqdm=True)
    callbacks = make_callbacks({"final_sparsity": 0.5, "start_step": 1, "end_step": 4, "saliency": "magnitude"})
    trainer = Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows[:8], callbacks=callbacks)
    callbacks.bind(trainer)
    trainer.train()
    _, lines, results = parse_log_history(trainer.state.log_history)
    assert results is not None and lines
    for table in [results, *lines]:
        assert not any("/" in str(k) or "sparsity" in str(k).lower() or "pruning" in str(k).lower() for k in table), table
    assert any("sparsity/" in k for e in trainer.state.log_history for k in e)  # the figures are still logged
    del torch


# ------------------------------------------------------------------ 11. slimming says what it cut
def test_slimming_logs_what_was_cut(tmp_path, capsys, caplog):
    recipe = tiny_recipe(tmp_path, tmp_path / "out", pruning={"granularity": "ffn_neurons", "final_sparsity": 0.5,
                                                               "start_step": 1, "end_step": 3},
                         output={"slim": True, "plot": False})
    with caplog.at_level(logging.WARNING, logger="prune_callbacks"):
        code, err = _run(capsys, ["finetune", str(write_recipe(tmp_path / "r.yaml", recipe))])
    assert code == 0, err
    text = caplog.text
    assert "slim" in text and "parameters" in text and "intermediate_size 37 ->" in text


# ------------------------------------------------------------------ issue 24: layering and problems as data
def test_adapter_config_files_do_not_import_the_recipe_layer(tmp_path):
    import subprocess
    import sys

    (tmp_path / "p.yaml").write_text("pruning:\n  final_sparsity: 0.5\n  granularity: 2:4\n")
    code = ("import sys; from prune_callbacks.integrations.configs import config_from_file; "
            f"c = config_from_file({str(tmp_path / 'p.yaml')!r}); assert c.granularity == '2:4', c; "
            "print(sorted(m for m in sys.modules if m.startswith('prune_callbacks.recipe')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_schedule_problems_reach_the_recipe_as_data(tmp_path):
    recipe = tiny_recipe(tmp_path, tmp_path / "out", pruning={"start_step": 1, "end_step": 9})
    with pytest.raises(RecipeError) as info:
        load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    assert [path for path, _ in info.value.problems] == ["pruning.end_step"]
    assert "training.max_steps=4" in info.value.problems[0][1]
