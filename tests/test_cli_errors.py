"""Every user mistake: input -> exit code -> message fragment, one message, never a traceback.

``validate`` catches what can be checked without training; ``validate --load`` what needs the model;
``finetune`` refuses exactly the same (one code path, :mod:`prune_callbacks.recipe.preflight`).
Tiny local BERT + CSV (tests/recipe_fixtures.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from prune_callbacks.cli import main
from recipe_fixtures import tiny_recipe, write_recipe


def _set(recipe: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    node = recipe
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return recipe


def _run(capsys, argv) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "Traceback" not in text
    return code, captured.err


# name, {dotted key: value} applied to the tiny recipe, extra argv, exit code, fragments of the message
RECIPE_CASES = [
    ("batch-size-0", {"training.per_device_train_batch_size": 0}, [], 2,
     ["training.per_device_train_batch_size: per_device_train_batch_size=0 is invalid", "allowed: >= 1"]),
    ("eval-batch-size-0", {"training.per_device_eval_batch_size": 0}, [], 2,
     ["training.per_device_eval_batch_size", "allowed: >= 1"]),
    ("accumulation-0", {"training.gradient_accumulation_steps": 0}, [], 2, ["training.gradient_accumulation_steps"]),
    ("max-steps-0", {"training.max_steps": 0}, [], 2, ["training.max_steps: max_steps=0 is invalid", "allowed: >= 1"]),
    ("epochs-0", {"training.max_steps": -1, "training.num_train_epochs": 0}, [], 2, ["training.num_train_epochs"]),
    ("negative-lr", {"training.learning_rate": -1.0}, [], 2, ["training.learning_rate", ">= 0"]),
    ("resume-key", {"training.resume_from_checkpoint": "x"}, [], 2, ["training.resume_from_checkpoint", "--resume"]),
    ("text-column", {"data.text_column": "sentence"}, [], 2,
     ["data.text_column: column 'sentence' is not in the train split", "allowed: text, label"]),
    ("label-column", {"data.label_column": "stars"}, [], 2, ["data.label_column: column 'stars'", "allowed: text, label"]),
    ("train-split", {"data.train_split": "training"}, [], 2, ["data.train_split: split 'training' does not exist",
                                                             "allowed: train, validation"]),
    ("eval-split", {"data.eval_split": "dev"}, [], 2, ["data.eval_split", "eval_fraction"]),
    ("output-parent-is-file", {"output.dir": "{tmp}/afile/out"}, [], 2, ["output.dir", "is a file"]),
    ("resume-new-dir", {}, ["--resume"], 2, ["output.dir", "does not exist", "no unfinished run to resume"]),
    ("output-is-the-model", {"output.dir": "{tmp}/tiny-assets/model", "output.overwrite": True}, [], 2,
     ["output.dir", "is the model directory the run starts from"]),
    ("pruning-empty-list", {"pruning": []}, [], 2, ["pruning: pruning=[] lists no config"]),
    ("pruning-not-mapping", {"pruning": 3}, [], 2, ["pruning: must be a mapping (one PruningConfig) or a list"]),
    ("pruning-list-unknown-key", {"pruning": [{"final_sparsity": 0.5}, {"fooo": 1}]}, [], 2,
     ["pruning.1.fooo: unknown key 'fooo'", "allowed keys:"]),
    ("pruning-list-bad-value", {"pruning": [{"final_sparsity": 2}]}, [], 2, ["pruning.0.final_sparsity", "[0, 1)"]),
    ("pruning-list-bad-steps", {"pruning": [{"final_sparsity": 0.5, "start_step": 10, "end_step": 20}]}, [], 2,
     ["pruning.0", "training.max_steps=4"]),
    ("include-matches-nothing", {"pruning.include": ["no_such_module"]}, ["--load"], 2,
     ["pruning: the pruning config does not fit the model", "no_such_module"]),
    ("exclude-removes-everything", {"pruning.exclude": ["."]}, ["--load"], 2, ["pruning: the pruning config does not fit"]),
    ("max-length-too-long", {"data.max_length": 1000}, ["--load"], 2, ["data.max_length: max_length=1000", "<= 64"]),
]


@pytest.mark.parametrize("changes, argv, code, fragments", [c[1:] for c in RECIPE_CASES], ids=[c[0] for c in RECIPE_CASES])
def test_validate_refuses_what_finetune_would(tmp_path, capsys, changes, argv, code, fragments):
    (tmp_path / "afile").write_text("x")
    recipe = tiny_recipe(tmp_path, tmp_path / "out")
    for key, value in changes.items():
        _set(recipe, key, value.format(tmp=tmp_path) if isinstance(value, str) else value)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    got, err = _run(capsys, ["validate", str(path), *argv])
    assert got == code, err
    for fragment in fragments:
        assert fragment in err
    # finetune runs the same checks first: same exit code, same message, nothing written
    finetune_argv = [a for a in argv if a != "--load"]
    got, err_finetune = _run(capsys, ["finetune", str(path), *finetune_argv])
    assert got == code and err_finetune.split("invalid recipe:", 1)[1] == err.split("invalid recipe:", 1)[1]
    assert not (tmp_path / "out").exists()


# name, file name, its bytes, fragments: local data files that cannot be used, found by plain validate
DATA_CASES = [
    ("ragged-csv", "t.csv", b"text,label\na b,1\nc,d,0,9\ne,1\n", ["data.files: could not load the data",
                                                                   "Expected 2 fields in line 3, saw 4"]),
    ("empty-csv", "t.csv", b"", ["data.files: could not load the data", "No columns to parse"]),
    ("broken-jsonl", "t.jsonl", b'{"text": "a", "label": 1}\n{"text": "b", "label"\n', ["JSON parse error"]),
    ("not-utf8", "t.csv", b"text,label\n\xff\xfe bad,1\n", ["data.files", "utf-8"]),
    ("empty-text", "t.csv", b"text,label\ngood film,1\n,0\nbad film,0\n,1\n",
     ["data.text_column: 2 of 4 rows of the train split have no text", "allowed: a string in every row"]),
    ("float-labels", "t.csv", b"text,label\ngood,1.5\nbad,0\n", ["data.label_column: labels must be all ints or all strings"]),
]


@pytest.mark.parametrize("name, body, fragments", [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_unusable_local_data_is_found_by_validate(tmp_path, capsys, name, body, fragments):
    data = tmp_path / name
    data.write_bytes(body)
    recipe = tiny_recipe(tmp_path, tmp_path / "out", data={"files": {"train": str(data), "validation": str(data)}})
    code, err = _run(capsys, ["validate", str(write_recipe(tmp_path / "r.yaml", recipe))])
    assert code == 2
    for fragment in fragments:
        assert fragment in err


# name, file text, exit code, fragments (the file is r.yaml)
YAML_CASES = [
    ("colon-in-value", "task: sequence-classification\ndescription: ratio: 2\n", ["r.yaml:2:", "a second ':' on one line"]),
    ("tab", "task: sequence-classification\nmodel:\n\tname: minilm\n", ["r.yaml:3:", "tab character"]),
    ("unclosed-quote", "task: 'sequence-classification\n", ["r.yaml:", "unclosed quote"]),
    ("bad-indent", "task: causal-lm\nmodel:\n  name: smollm2\n   dtype: float32\n", ["r.yaml:4:", "not valid YAML"]),
    ("duplicate-key", "task: causal-lm\ntask: causal-lm\n", ["r.yaml:2:", "duplicate key 'task' (first at line 1)"]),
    ("not-a-mapping", "- a\n- b\n", ["a recipe must be a mapping of sections (got list)"]),
]


@pytest.mark.parametrize("text, fragments", [c[1:] for c in YAML_CASES], ids=[c[0] for c in YAML_CASES])
def test_yaml_syntax_errors_name_file_line_and_the_problem_in_words(tmp_path, capsys, text, fragments):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    code, err = _run(capsys, ["validate", str(path)])
    assert code == 2
    for fragment in fragments:
        assert fragment in err
    assert "<root>" not in err and "MarkedYAMLError" not in err and "in \"<unicode string>\"" not in err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finished")
    path = write_recipe(tmp / "r.yaml", tiny_recipe(tmp, tmp / "out"))
    assert main(["finetune", str(path)]) == 0
    return tmp / "out"


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncate" else b"\x00" * 64 + data[64:])


# name, what to copy (relative to the run), file to damage inside the copy, how, path to report, code, fragments
REPORT_CASES = [
    ("pruning-state-truncated", "checkpoints/checkpoint-4", "pruning_state.safetensors", "truncate", ".", 1,
     ["pruning_state.safetensors is damaged", "earlier checkpoint"]),
    ("pruning-state-zeroed", "checkpoints/checkpoint-4", "pruning_state.safetensors", "zero", ".", 1,
     ["pruning_state.safetensors is damaged"]),
    ("sparse-header-zeroed", "sparse", "model.sparse.safetensors", "zero", ".", 1,
     ["model.sparse.safetensors is a damaged sparse checkpoint"]),
    ("sparse-truncated", "sparse", "model.sparse.safetensors", "truncate", ".", 1, ["model.sparse.safetensors"]),
    ("weights-truncated", ".", "model.safetensors", "truncate", ".", 1, ["model.safetensors is not a readable safetensors"]),
    ("no-weights", ".", "model.safetensors", "delete", ".", 1, ["holds no model weights"]),
    ("missing-path", ".", None, None, "nope", 1, ["no such file or directory"]),
    ("shard-index-damaged", ".", "model.safetensors.index.json", "garbage", ".", 1,
     ["model.safetensors.index.json is damaged (not a shard index"]),
]


@pytest.mark.parametrize("copy, damaged, how, target, code, fragments", [c[1:] for c in REPORT_CASES],
                         ids=[c[0] for c in REPORT_CASES])
def test_report_on_damaged_files(finished_run, tmp_path, capsys, copy, damaged, how, target, code, fragments):
    folder = tmp_path / "copy"
    shutil.copytree(finished_run / copy, folder, ignore=shutil.ignore_patterns("checkpoints", "sparse") if copy == "." else None)
    if damaged:
        if how == "delete":
            (folder / damaged).unlink()
        elif how == "garbage":  # a sharded checkpoint whose index is not JSON
            (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
            (folder / damaged).write_text("{not json")
        else:
            _damage(folder / damaged, how)
    got, err = _run(capsys, ["report", str(folder / target)])
    assert got == code, err
    for fragment in fragments:
        assert fragment in err
    assert err.count("\n") <= 2  # one message


def test_report_reads_the_undamaged_files(finished_run, capsys):
    for target in (".", "sparse", "checkpoints/checkpoint-4"):
        code, _ = _run(capsys, ["report", str(finished_run / target), "--json"])
        assert code == 0


def test_validate_load_accepts_the_tiny_recipe_and_says_what_it_checked(tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, tmp_path / "out"))
    capsys.readouterr()
    assert main(["validate", str(path), "--load"]) == 0
    out = capsys.readouterr().out
    assert "checked: recipe, output (new directory), data (24 train / 8 eval rows), model and pruning targets" in out
    assert "not checked" not in out


def test_several_pruning_configs_validate_at_the_schema_level(tmp_path):
    from prune_callbacks.recipe import load_recipe, recipe_to_yaml
    from prune_callbacks.recipe.loading import validate_data

    recipe = tiny_recipe(tmp_path, tmp_path / "out", pruning=[
        {"include": ["intermediate"], "final_sparsity": 0.5, "saliency": "magnitude"},
        {"include": ["attention"], "final_sparsity": 0.3, "saliency": "magnitude", "scope": "per_layer"}])
    path = write_recipe(tmp_path / "r.yaml", recipe)
    loaded = load_recipe(path)
    assert [c.final_sparsity for c in loaded.pruning_configs] == [0.5, 0.3]
    assert loaded.pruning_configs[1].scope == "per_layer"
    again = validate_data(yaml.safe_load(recipe_to_yaml(loaded)))  # the resolved copy keeps the list
    assert again == loaded
    single = load_recipe(write_recipe(tmp_path / "one.yaml", tiny_recipe(tmp_path, tmp_path / "o")))
    assert len(single.pruning_configs) == 1 and single.pruning_configs[0] is single.pruning


def test_validate_load_lists_the_schedule_advice(tmp_path, capsys):
    """Removing blocks at the very end of the run is allowed but warned: ``validate --load`` prints it after OK."""
    recipe = tiny_recipe(tmp_path, tmp_path / "out", pruning={"granularity": "blocks", "final_sparsity": 0.5,
                                                              "start_step": 1, "end_step": 4, "update_every": 1,
                                                              "saliency": "magnitude"},
                         output={"dir": str(tmp_path / "out"), "plot": False, "slim": True})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    capsys.readouterr()
    assert main(["validate", str(path), "--load"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK ") and "\nwarning: granularity='blocks': the last block is removed at step 4 of 4" in out
    _set(recipe, "pruning.end_step", 2)  # half the run left: nothing to say
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe)), "--load"]) == 0
    assert "warning:" not in capsys.readouterr().out
