"""The output directory's lifecycle (prune_callbacks.recipe.lifecycle): overwrite leaves only this
run's artefacts; failed, interrupted and killed runs never block the next run; --resume continues
from the newest complete checkpoint; final artefacts appear atomically. Tiny local BERT + CSV."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from prune_callbacks.cli import main
from prune_callbacks.recipe import lifecycle
from prune_callbacks.recipe.loading import validate_data
from recipe_fixtures import tiny_recipe, write_recipe

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def _names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def _fail_at_step(monkeypatch, step: int, error: BaseException) -> None:
    original = transformers.Trainer.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step + 1 >= step:
            raise error
        return original(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "training_step", training_step)


def _kill_run(mode: str, recipe: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(TESTS / "lifecycle_kill_script.py"), mode, str(recipe), *args],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILL, as a real kill
    return proc


# ----------------------------------------------------------------------------- overwrite
def test_overwrite_leaves_only_this_runs_artefacts(tmp_path, capsys):
    out = tmp_path / "out"
    first = write_recipe(tmp_path / "a.yaml", tiny_recipe(tmp_path, out, output={"plot": True, "save_sparse": True}))
    assert main(["finetune", str(first)]) == 0
    assert {"sparse", "sparsity.png", "checkpoints", "model.safetensors"} <= _names(out)
    (out / "notes.txt").write_text("mine")  # a file no run wrote
    second = write_recipe(tmp_path / "b.yaml", tiny_recipe(
        tmp_path, out, pruning={"final_sparsity": 0.25, "start_step": 1, "end_step": 3, "update_every": 1,
                                "saliency": "magnitude"},
        training={"save_strategy": "no"}, output={"plot": False, "save_sparse": False, "overwrite": True}))
    assert main(["finetune", str(second)]) == 0
    names = _names(out)
    assert not {"sparse", "sparsity.png", "checkpoints", lifecycle.MARKER, lifecycle.STAGING} & names
    assert {"model.safetensors", "config.json", "report.json", "notes.txt", lifecycle.MANIFEST} <= names
    report = json.loads((out / "report.json").read_text())
    assert report["sparsity"]["final_sparsity"] == 0.25 and report["sizes"]["sparse_dir"] is None
    assert report["sparsity"]["target_sparsity"] == pytest.approx(0.25, abs=0.01)
    manifest = json.loads((out / lifecycle.MANIFEST).read_text())["artefacts"]
    assert "notes.txt" not in manifest and "model.safetensors" in manifest


def test_a_finished_run_is_refused_without_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, out, training={"save_strategy": "no"}))
    assert main(["finetune", str(recipe)]) == 0
    capsys.readouterr()
    for command in (["validate", str(recipe)], ["finetune", str(recipe)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "output.dir" in err and "not empty" in err and "output.overwrite" in err and "Traceback" not in err
    assert main(["finetune", str(recipe), "--resume"]) == 2
    assert "holds a finished run" in capsys.readouterr().err


# ----------------------------------------------------------------------------- failures inside the process
@pytest.mark.parametrize("existing", [False, True], ids=["new-dir", "empty-dir"])
def test_a_torch_error_leaves_the_directory_as_found(tmp_path, monkeypatch, existing):
    out = tmp_path / "out"
    if existing:
        out.mkdir()
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, out))
    _fail_at_step(monkeypatch, 1, RuntimeError("CUDA error: an illegal memory access (simulated)"))
    with pytest.raises(RuntimeError, match="simulated"):  # a real bug keeps its traceback ...
        main(["finetune", str(recipe)])
    assert out.exists() == existing and _names(out) == set()  # ... and leaves nothing behind
    monkeypatch.undo()
    assert main(["finetune", str(recipe)]) == 0


def test_a_recipe_error_found_after_the_model_loaded_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        tmp_path, out, pruning={"include": ["no_such_module"], "saliency": "magnitude"}))
    assert main(["validate", str(recipe)]) == 0  # the model is not loaded: says what it did not check
    assert "not checked: model not loaded" in capsys.readouterr().out
    messages = []
    for command in (["validate", str(recipe), "--load"], ["finetune", str(recipe)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "pruning" in err and "no_such_module" in err and "Traceback" not in err
        messages.append(err.split("invalid recipe:", 1)[1])
    assert messages[0] == messages[1]  # one code path: finetune refuses exactly what validate --load refuses
    assert not out.exists()


def test_ctrl_c_keeps_the_checkpoints_and_resume_continues_exactly(tmp_path, monkeypatch, capsys):
    straight = tmp_path / "straight"
    assert main(["finetune", str(write_recipe(tmp_path / "s.yaml", tiny_recipe(tmp_path, straight)))]) == 0

    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, out))
    _fail_at_step(monkeypatch, 3, KeyboardInterrupt())
    capsys.readouterr()
    assert main(["finetune", str(recipe)]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err
    assert _names(out) == {lifecycle.MARKER, "checkpoints"} and _names(out / "checkpoints") == {"checkpoint-2"}
    monkeypatch.undo()

    assert main(["finetune", str(recipe)]) == 2  # checkpoints would be lost: say what to do
    err = capsys.readouterr().err
    assert "unfinished" in err and "checkpoint-2" in err and "--resume" in err and "output.overwrite" in err
    assert main(["validate", str(recipe), "--resume"]) == 0
    assert "resumes from checkpoint-2" in capsys.readouterr().out
    assert main(["finetune", str(recipe), "--resume"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["training"]["resumed_from"].endswith("checkpoint-2") and report["training"]["global_step"] == 4
    assert lifecycle.MARKER not in _names(out)
    a, b = _weights(straight), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same as never interrupted


# ----------------------------------------------------------------------------- SIGKILL (subprocess)
def test_killed_while_writing_a_checkpoint_resumes_from_the_last_complete_one(tmp_path, capsys, caplog):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, out))
    _kill_run("checkpoint:4", recipe)
    assert lifecycle.MARKER in _names(out)
    assert _names(out / "checkpoints") == {"checkpoint-2", "checkpoint-4"}
    assert not (out / "checkpoints" / "checkpoint-4" / "trainer_state.json").exists()  # half-written
    assert "model.safetensors" not in _names(out)
    with caplog.at_level(logging.WARNING, logger="prune_callbacks.recipe"):
        assert main(["finetune", str(recipe), "--resume", "--set", "training.logging_steps=2"]) == 0
    assert "differs from the interrupted run's in training.logging_steps" in caplog.text
    report = json.loads((out / "report.json").read_text())
    assert report["training"]["resumed_from"].endswith("checkpoint-2")
    assert (out / "checkpoints" / "checkpoint-4" / "trainer_state.json").is_file()  # written again, whole


def test_killed_during_the_final_save_publishes_nothing_and_the_next_run_finishes(tmp_path, capsys):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, out))
    _kill_run("final-save", recipe)
    names = _names(out)
    assert lifecycle.MARKER in names and lifecycle.STAGING in names
    assert not {"model.safetensors", "config.json", "sparse", "report.json"} & names  # nothing looks complete
    assert list((out / lifecycle.STAGING).glob("sparse/.sparse-tmp-*/*"))  # the large temporary file is there
    assert main(["finetune", str(recipe), "--set", "output.resume=auto"]) == 0
    names = _names(out)
    assert lifecycle.STAGING not in names and lifecycle.MARKER not in names and "sparse" in names
    assert not list(out.rglob(".sparse-tmp-*"))
    assert json.loads((out / "report.json").read_text())["training"]["resumed_from"].endswith("checkpoint-4")


def test_killed_before_any_checkpoint_the_directory_is_reused(tmp_path, caplog):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, out))
    _kill_run("train:1", recipe)
    assert lifecycle.MARKER in _names(out)
    with caplog.at_level(logging.WARNING, logger="prune_callbacks.recipe"):
        assert main(["finetune", str(recipe)]) == 0
    assert "only an unfinished run's leftovers" in caplog.text and "reusing the directory" in caplog.text
    assert lifecycle.MARKER not in _names(out)


# ----------------------------------------------------------------------------- plan_output, by hand
def _checkpoint(out: Path, step: int, complete: bool = True) -> None:
    folder = out / "checkpoints" / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x")
    if complete:
        (folder / "trainer_state.json").write_text("{}")
        (folder / "pruning_state.safetensors").write_bytes(b"x")


def _finished(out: Path) -> None:
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"x")
    (out / lifecycle.MANIFEST).write_text('{"artefacts": ["model.safetensors"]}')


def _leftovers(*checkpoints):
    def build(out: Path) -> None:
        out.mkdir()
        (out / lifecycle.MARKER).write_text("{}")
        for step, complete in checkpoints:
            _checkpoint(out, step, complete)
    return build


def _old_version_leftovers(out: Path) -> None:  # an empty checkpoints/ from before the marker existed
    (out / "checkpoints").mkdir(parents=True)


# build, output keys -> state, resume_from, error fragment (None: accepted)
PLANS = [
    ("missing", lambda out: None, {}, "new", None, None),
    ("empty", lambda out: out.mkdir(), {}, "empty", None, None),
    ("finished", _finished, {}, "finished", None, "is not empty"),
    ("finished+overwrite", _finished, {"overwrite": True}, "finished", None, None),
    ("finished+resume", _finished, {"resume": True}, "finished", None, "holds a finished run"),
    ("finished+auto", _finished, {"resume": "auto"}, "finished", None, "is not empty"),
    ("marker-only", _leftovers(), {}, "leftovers", None, None),
    ("old-version", _old_version_leftovers, {}, "leftovers", None, None),
    ("ckpt", _leftovers((2, True)), {}, "leftovers", None, "--resume (output.resume: true)"),
    ("ckpt+resume", _leftovers((2, True), (4, False)), {"resume": True}, "leftovers", "checkpoint-2", None),
    ("ckpt+auto", _leftovers((2, True)), {"resume": "auto"}, "leftovers", "checkpoint-2", None),
    ("ckpt+overwrite", _leftovers((2, True)), {"overwrite": True}, "leftovers", None, None),
    ("half-ckpt", _leftovers((2, False)), {}, "leftovers", None, None),
    ("half-ckpt+resume", _leftovers((2, False)), {"resume": True}, "leftovers", None, "left no complete checkpoint"),
    ("half-ckpt+auto", _leftovers((2, False)), {"resume": "auto"}, "leftovers", None, None),
    ("missing+resume", lambda out: None, {"resume": True}, "new", None, "does not exist"),
]


@pytest.mark.parametrize("build, output, state, resume_from, error", [p[1:] for p in PLANS], ids=[p[0] for p in PLANS])
def test_plan_output(tmp_path, build, output, state, resume_from, error):
    out = tmp_path / "out"
    build(out)
    recipe = validate_data({"task": "sequence-classification", "model": {"name": "minilm"},
                            "data": {"name": "rotten_tomatoes"}, "output": {"dir": str(out), **output}})
    if error:
        with pytest.raises(ValueError, match=None) as info:
            lifecycle.plan_output(recipe)
        assert error in str(info.value) and "output.dir" in str(info.value)
        return
    plan = lifecycle.plan_output(recipe)
    assert plan.state == state
    assert (plan.resume_from.name if plan.resume_from else None) == resume_from
    run = lifecycle.RunDirectory(plan).begin()
    assert (out / lifecycle.MARKER).is_file()
    if resume_from == "checkpoint-2":  # newer half-written checkpoints are removed, the resumed one kept
        assert _names(out / "checkpoints") == {"checkpoint-2"}
    elif output.get("overwrite") or state == "leftovers":
        assert _names(out) == {lifecycle.MARKER}
    run.abort()
    assert lifecycle.MARKER in _names(out) if resume_from else lifecycle.MARKER not in _names(out)


def test_output_dir_that_is_a_file(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, tmp_path / "file.txt"))
    (tmp_path / "file.txt").write_text("x")
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "output.dir" in err and "is a file" in err and "Traceback" not in err
