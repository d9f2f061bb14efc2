"""Recipe files, schema and validation messages (no model or data is loaded here)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from prune_callbacks.core.config import PruningConfig
from prune_callbacks.recipe import RecipeError, load_recipe, recipe_to_yaml, validate_data
from prune_callbacks.recipe.loading import parse_set
from prune_callbacks.recipe.schema import Recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
RECIPE_FILES = sorted(RECIPES.glob("*.yaml"))

BASE = {
    "task": "sequence-classification",
    "model": {"source": "builtin", "name": "minilm"},
    "data": {"source": "builtin", "name": "rotten_tomatoes"},
    "training": {"max_steps": 100},
}


def write(tmp_path: Path, data, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def test_the_shipped_recipes_exist():
    assert {p.name for p in RECIPE_FILES} >= {"quickstart.yaml", "minilm-rt-90.yaml", "smollm2-kjv-50.yaml", "template.yaml",
                                              "minilm-rt-slim.yaml", "smollm2-kjv-slim.yaml"}


@pytest.mark.parametrize("name", ["minilm-rt-slim.yaml", "smollm2-kjv-slim.yaml"])
def test_slim_recipes_are_structured_with_distillation(name):
    recipe = load_recipe(RECIPES / name)
    assert recipe.output.slim and recipe.distillation is not None
    assert recipe.pruning.granularity == "ffn_neurons" and 0 < recipe.pruning.final_sparsity <= 0.5


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.output.dir  # default filled in


def test_quickstart_is_sized_for_a_cpu():
    r = load_recipe(RECIPES / "quickstart.yaml")
    assert r.model.name == "minilm" and r.data.name == "rotten_tomatoes"
    assert 0.8 <= r.pruning.final_sparsity <= 0.9
    assert 150 <= r.training["max_steps"] <= 250
    assert r.data.max_train_samples <= 2500 and r.data.max_length <= 64


def _schema_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    names = []
    for name, field in model.model_fields.items():
        names.append(f"{prefix}{name}")
        inner = PruningConfig if model is Recipe and name == "pruning" else field.annotation  # mapping | list
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            names += _schema_fields(inner, f"{prefix}{name}.")
    return names


def _template_sections(text: str) -> dict[str, str]:
    """Top-level key -> its block of text (comments included)."""
    sections, current = {"": ""}, ""
    for line in text.splitlines():
        match = re.match(r"^(\w+):", line)
        if match:
            current = match.group(1)
            sections[current] = ""
        sections[current] += line + "\n"
    return sections


def test_template_mentions_every_schema_field():
    sections = _template_sections((RECIPES / "template.yaml").read_text())
    fields = _schema_fields(Recipe)
    assert "pruning.final_sparsity" in fields and "data.max_length" in fields  # the walk reaches nested sections
    assert set(PruningConfig.model_fields) <= {f.split(".", 1)[1] for f in fields if f.startswith("pruning.")}
    missing = []
    for field in fields:
        section, _, key = field.rpartition(".")
        block = sections.get(section, "") if section else "".join(f"{k}:\n" for k in sections)
        if not re.search(rf"^\s*#?\s*{re.escape(key)}:", block, re.M):
            missing.append(field)
    assert not missing, f"template.yaml does not mention: {missing}"


def test_template_values_are_the_defaults():
    """Uncommented template values equal the schema defaults, so the template cannot drift."""
    data = yaml.safe_load((RECIPES / "template.yaml").read_text())
    defaults = Recipe.model_validate({k: BASE[k] for k in ("task", "model", "data")})
    for section in ("model", "data", "pruning", "evaluation", "output"):
        for key, value in data[section].items():
            assert getattr(getattr(defaults, section), key) == value, f"{section}.{key}"


@pytest.mark.parametrize("value", [True, False, "train_begin", "before_pruning"])
def test_dense_timing_values(tmp_path, value):
    assert load_recipe(write(tmp_path, BASE)).evaluation.dense == "before_pruning"  # the default, for every task
    recipe = load_recipe(write(tmp_path, {**BASE, "evaluation": {"dense": value}}))
    assert recipe.evaluation.dense == value
    assert load_recipe(write(tmp_path, recipe_to_yaml(recipe), "again.yaml")) == recipe


def test_resolved_copy_round_trips(tmp_path):
    recipe = load_recipe(RECIPES / "quickstart.yaml", ["pruning.final_sparsity=0.8", "training.learning_rate=2e-5"])
    again = load_recipe(write(tmp_path, recipe_to_yaml(recipe)))
    assert again == recipe
    assert again.training["learning_rate"] == pytest.approx(2e-5)  # YAML's "2e-5" string became a float


def test_set_values_are_yaml_and_validated_like_the_file(tmp_path):
    path = write(tmp_path, BASE)
    r = load_recipe(path, ["pruning.final_sparsity=0.5", "output.save_sparse=false", "pruning.exclude=[query]",
                           "evaluation.metrics=[f1, accuracy]"], output_dir="out/x", max_steps=7)
    assert r.pruning.final_sparsity == 0.5 and r.output.save_sparse is False and r.pruning.exclude == ["query"]
    assert r.metrics == ["f1", "accuracy"] and r.output.dir == "out/x" and r.training["max_steps"] == 7
    assert parse_set("a.b=") == ("a.b", None)
    with pytest.raises(RecipeError, match=r"expected dotted.key=value"):
        load_recipe(path, ["pruning.final_sparsity"])
    with pytest.raises(RecipeError, match=r"--set: pruning.final_sparsity: .*1.5.*\[0, 1\)"):
        load_recipe(path, ["pruning.final_sparsity=1.5"])
    with pytest.raises(RecipeError, match=r"task is 'sequence-classification', not a section"):
        load_recipe(path, ["task.x=1"])


YES_NO_FILE = """\
task: sequence-classification
model: {source: builtin, name: minilm}
data: {source: builtin, name: rotten_tomatoes}
training:
  max_steps: 100
  save_strategy: no
  report_to: none
pruning:
  exclude: [on, off]
output:
  save_sparse: no
  overwrite: yes
"""
YES_NO_SET = ["training.save_strategy=no", "training.report_to=none", "pruning.exclude=[on, off]",
              "output.save_sparse=no", "output.overwrite=yes"]


@pytest.mark.parametrize("where", ["file", "--set"])
def test_yes_no_on_off_are_words_where_a_string_is_expected_and_booleans_where_a_bool_is(tmp_path, where):
    """YAML 1.1 would read ``no`` as False and hand TrainingArguments ``save_strategy=False``."""
    if where == "file":
        recipe = load_recipe(write(tmp_path, YES_NO_FILE))
    else:
        recipe = load_recipe(write(tmp_path, BASE), YES_NO_SET)
    assert recipe.training["save_strategy"] == "no" and recipe.training["report_to"] == "none"
    assert recipe.output.save_sparse is False and recipe.output.overwrite is True
    assert recipe.pruning.exclude == ["on", "off"]
    again = load_recipe(write(tmp_path, recipe_to_yaml(recipe), "again.yaml"))  # the resolved copy keeps the words
    assert again.training["save_strategy"] == "no" and again.pruning.exclude == ["on", "off"]


@pytest.mark.parametrize("raw, value", [("True", True), ("FALSE", False), ("false", False), ("no", "no"),
                                         ("Off", "Off"), ("y", "y"), ("'true'", "true")])
def test_set_reads_only_true_and_false_as_booleans(raw, value):
    assert parse_set(f"a.b={raw}") == ("a.b", value)


def test_default_output_dir_is_named_after_the_file(tmp_path):
    assert load_recipe(write(tmp_path, BASE, "my-run.yaml")).output.dir == str(Path("runs") / "my-run")


# (what to change, expected message fragments: yaml path, value, what is allowed)
BROKEN = {
    "final sparsity 1": ({"pruning": {"final_sparsity": 1.0}},
                         ["pruning.final_sparsity:", "1.0", "[0, 1)"]),
    "final sparsity >1": ({"pruning": {"final_sparsity": 1.5}}, ["pruning.final_sparsity:", "1.5", "[0, 1)"]),
    "end before start": ({"pruning": {"start_step": 0.6, "end_step": 0.2}},
                         ["pruning.end_step:", "end_step=0.2", "before start_step=0.6", "allowed: end_step >= start_step"]),
    "end beyond max_steps": ({"pruning": {"end_step": 500}},
                             ["pruning.end_step:", "500", "end_step <= 100"]),
    "unknown metric": ({"evaluation": {"metrics": ["bleu"]}},
                       ["evaluation.metrics.0:", "'bleu'", "allowed: accuracy, f1"]),
    "metric of the other task": ({"evaluation": {"metrics": ["perplexity"]}},
                                 ["evaluation.metrics.0:", "'perplexity'", "allowed: accuracy, f1"]),
    "unknown top-level key": ({"trainig": {}}, ["trainig:", "unknown key 'trainig'", "did you mean 'training'", "allowed keys:"]),
    "unknown section key": ({"model": {"name": "minilm", "nam": "x"}},
                            ["model.nam:", "unknown key 'nam'", "allowed keys: dtype, name, revision, source"]),
    "unknown pruning key": ({"pruning": {"sparsity": 0.5}},
                            ["pruning.sparsity:", "unknown key 'sparsity'", "final_sparsity"]),
    "wrong type": ({"pruning": {"update_every": "often"}}, ["pruning.update_every:", "'often'", "integer"]),
    "wrong literal": ({"pruning": {"schedule": "exponential"}},
                      ["pruning.schedule:", "'exponential'", "schedule='exponential' is unknown; valid: cubic, linear, oneshot"]),
    "section not a mapping": ({"output": "runs/x"}, ["output:", "must be a mapping", "'runs/x'"]),
    "missing task": ({"task": None}, ["task:", "sequence-classification, causal-lm"]),
    "unknown builtin model": ({"model": {"name": "gpt5"}}, ["model.name:", "'gpt5'", "allowed: minilm, smollm2"]),
    "builtin model of other task": ({"model": {"name": "smollm2"}},
                                    ["model.name:", "'smollm2'", "allowed for sequence-classification: minilm"]),
    "local model dir missing": ({"model": {"source": "local", "name": "/nonexistent/model"}},
                                ["model.name:", "'/nonexistent/model'", "save_pretrained"]),
    "revision without hub": ({"model": {"name": "minilm", "revision": "main"}},
                             ["model.revision:", "'main'", "hub only"]),
    "unknown builtin data": ({"data": {"name": "imdb"}}, ["data.name:", "'imdb'", "rotten_tomatoes, kjv"]),
    "local data without files": ({"data": {"source": "local", "name": None}}, ["data.files:", "required", "split -> path"]),
    "local file missing": ({"data": {"source": "local", "name": None, "files": {"train": "/nonexistent/t.csv"}}},
                           ["data.files:", "/nonexistent/t.csv", "does not exist"]),
    "local file bad extension": ({"data": {"source": "local", "name": None, "files": {"train": "t.txt"}}},
                                 ["data.files:", "'t.txt'", ".csv, .json, .jsonl, .parquet"]),
    "max_length 0": ({"data": {"name": "rotten_tomatoes", "max_length": 0}}, ["data.max_length:", "0", "greater than 0"]),
    "dense timing": ({"evaluation": {"dense": "sometimes"}},
                     ["evaluation.dense:", "'sometimes'", "allowed: before_pruning, train_begin, true (= train_begin), false"]),
    "negative evaluations": ({"evaluation": {"during_training": -1}}, ["evaluation.during_training:", "-1", "greater than or equal to 0"]),
    "unknown training key": ({"training": {"learnig_rate": 1e-4}},
                             ["training.learnig_rate:", "did you mean 'learning_rate'", "TrainingArguments"]),
    "training value type": ({"training": {"per_device_train_batch_size": "big"}},
                            ["training.per_device_train_batch_size:", "'big'", "int"]),
    "training owned key": ({"training": {"output_dir": "x"}}, ["training.output_dir:", "'x'", "output.dir"]),
    "load best model": ({"training": {"load_best_model_at_end": True}},
                        ["training.load_best_model_at_end:", "less sparse", "allowed: false"]),
    "training value not finite": ({"training": {"learning_rate": float("nan")}},
                                  ["training.learning_rate:", "nan", "must be a finite number"]),
    "eval fraction not finite": ({"data": {"name": "rotten_tomatoes", "eval_fraction": float("inf")}},
                                 ["data.eval_fraction:", "inf", "finite number"]),
    "training rejected by TrainingArguments": ({"training": {"lr_scheduler_type": "sawtooth"}},
                                               ["training.lr_scheduler_type:", "sawtooth", "cosine"]),
}


def _merge(base: dict, change: dict) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in change.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {k: v for k, v in {**out[key], **value}.items() if v is not None}  # None deletes
        else:
            out[key] = value
    return out


@pytest.mark.parametrize("case", list(BROKEN), ids=list(BROKEN))
def test_broken_recipe_fails_with_path_value_and_allowed(tmp_path, case):
    change, fragments = BROKEN[case]
    path = write(tmp_path, _merge(BASE, change))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    assert str(path) in message  # every line says which file


@pytest.mark.parametrize("pruning_and_after, located", [
    ("  final_sparsity: 2.0\n  schedule: sawtooth\ntraining:\n  warmup: 3\n",
     [(7, "pruning.final_sparsity:"), (8, "pruning.schedule:"), (10, "training.warmup:")]),
    # a whole-config check lists each refused setting on its own line: each is located at its own field
    ("  schedule: oneshot\n  end_step: 0.6\n  update_every: 10\n",
     [(8, "pruning.end_step: end_step=0.6 does not apply to schedule='oneshot'"),
      (9, "pruning.update_every: update_every=10 does not apply to schedule='oneshot'")]),
], ids=["three sections", "whole-config check"])
def test_every_problem_is_reported_at_once_with_line_numbers(tmp_path, pruning_and_after, located):
    path = write(tmp_path, "task: sequence-classification\nmodel:\n  name: minilm\ndata:\n  name: rotten_tomatoes\n"
                           "pruning:\n" + pruning_and_after)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    lines = info.value.format_lines()
    assert len(lines) == len(located), lines
    for number, start in located:
        assert any(line.startswith(f"{path}:{number}: {start}") for line in lines), (number, start, lines)


@pytest.mark.parametrize("text, fragment", [
    ("task: [unclosed\n", "not valid YAML"),
    ("- a\n- b\n", "must be a mapping of sections"),
    ("task: causal-lm\ntask: sequence-classification\n", "duplicate key 'task'"),
    ("task: !!python/object:os.system echo\n", "not valid YAML"),  # safe loading only: no object construction
])
def test_yaml_problems(tmp_path, text, fragment):
    with pytest.raises(RecipeError, match=re.escape(fragment)):
        load_recipe(write(tmp_path, text))


def test_missing_file():
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe("/nonexistent/recipe.yaml")


def test_validate_data_accepts_a_causal_lm_recipe_with_local_files(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"text": "a"}\n')
    recipe = validate_data({"task": "causal-lm", "model": {"name": "smollm2"},
                            "data": {"source": "local", "files": {"train": str(tmp_path / "t.jsonl")}, "eval_fraction": 0.2}})
    assert recipe.metrics == ["perplexity"] and recipe.data.file_format == "json"
