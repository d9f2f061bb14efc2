"""The ``distillation:`` recipe section: validation messages, and a causal-LM finetune run that logs distill/*."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

pytest.importorskip("transformers")

from test_cli_finetune import WORDS, _tiny_causal_dir  # noqa: E402

from prune_callbacks.cli import main  # noqa: E402
from prune_callbacks.recipe import RecipeError, load_recipe  # noqa: E402

BASE = {
    "task": "sequence-classification",
    "model": {"source": "builtin", "name": "minilm"},
    "data": {"source": "builtin", "name": "rotten_tomatoes"},
    "training": {"max_steps": 100},
}


def write(tmp_path, data, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_section_defaults_and_off_by_default(tmp_path):
    assert load_recipe(write(tmp_path, BASE)).distillation is None
    recipe = load_recipe(write(tmp_path, {**BASE, "distillation": {"hardness": 1.0}}))
    assert recipe.distillation.hardness == 1.0 and recipe.distillation.teacher == "self"
    assert recipe.distillation.snapshot == "before_pruning"


@pytest.mark.parametrize("section, path, words", [
    ({"hardnes": 1.0}, "distillation.hardnes", ["unknown key 'hardnes'", "did you mean 'hardness'", "temperature"]),
    ({"hardness": 2.0}, "distillation.hardness", ["hardness=2.0", "[0, 1]"]),
    ({"teacher": "/no/such/dir"}, "distillation.teacher", ["no such folder"]),
    ({"snapshot": "end"}, "distillation.snapshot", ["'end'", "before_pruning"]),
])
def test_bad_section_names_path_value_and_allowed(tmp_path, section, path, words):
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, {**BASE, "distillation": section}))
    text = str(info.value)
    assert path in text
    for word in words:
        assert word in text


def test_causal_lm_recipe_with_distillation_logs_and_reports(tmp_path, capsys):
    model_dir = _tiny_causal_dir(tmp_path / "tiny-lm")
    text = tmp_path / "text.jsonl"
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (40,), generator=g)) for _ in range(30)]
    text.write_text("\n".join(json.dumps({"text": line}) for line in lines))
    recipe = write(tmp_path, {
        "task": "causal-lm",
        "model": {"source": "local", "name": str(model_dir)},
        "data": {"source": "local", "files": {"train": str(text)}, "eval_fraction": 0.2, "max_length": 16},
        "training": {"max_steps": 6, "per_device_train_batch_size": 4, "learning_rate": "1e-3", "logging_steps": 1},
        "pruning": {"final_sparsity": 0.5, "start_step": 3, "end_step": 5, "update_every": 1, "saliency": "magnitude"},
        "distillation": {"hardness": 0.5, "hidden_weight": 0.1},
        "evaluation": {"during_training": 0},
        "output": {"dir": str(tmp_path / "out"), "save_sparse": False, "plot": False},
    }, "lm.yaml")
    assert main(["finetune", str(recipe)]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    d = report["distillation"]
    assert d["config"]["hardness"] == 0.5 and d["teacher_step"] == 2 and d["teacher_bytes"] > 0
    assert [h["step"] for h in d["history"]] == [3, 4, 5, 6]  # the teacher exists from step 2 on
    assert all(h["distill/kd_loss"] >= 0 and h["distill/hidden_loss"] >= 0 for h in d["history"])
