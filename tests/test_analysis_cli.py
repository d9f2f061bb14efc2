"""``prune-callbacks analyze`` on the tiny local setup: every file written, suggested.yaml validates."""

import json

import pytest
import yaml

from prune_callbacks.cli import main
from prune_callbacks.recipe.loading import load_recipe
from recipe_fixtures import tiny_recipe, write_recipe


def test_analyze_writes_every_file_and_the_suggestion_validates(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, tmp_path / "run"))
    out = tmp_path / "analysis"
    assert main(["analyze", str(recipe), "--output-dir", str(out), "--calibration-rows", "8", "--eval-rows", "8"]) == 0
    for name in ("analysis.json", "ANALYSIS.md", "suggested.yaml", "spectra.png", "saliency_mass.png",
                 "head_similarity.png", "block_influence.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    a = json.loads((out / "analysis.json").read_text())
    assert len(a["blocks"]) == 2 and all("metric_skipped" in b for b in a["blocks"])
    assert "baseline" in a and a["head_fitted"] is True
    assert a["probe"]["pooling"] == "model"  # no sentence-transformers pooling config with this checkpoint
    suggested = load_recipe(out / "suggested.yaml")
    assert suggested.pruning.final_sparsity == 0.5  # same budget as the recipe analysed
    assert "# Suggested by" in (out / "suggested.yaml").read_text()
    assert main(["validate", str(out / "suggested.yaml")]) == 0


def test_analyze_user_error_exits_2(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, tmp_path / "run",
                                                           pruning={"include": ["no_such_module"]}))
    assert main(["analyze", str(recipe), "--output-dir", str(tmp_path / "a"), "--calibration-rows", "4",
                 "--eval-rows", "4"]) == 2
    assert "nothing to analyse" in capsys.readouterr().err


def test_llama_heads_with_grouped_kv(tmp_path):
    import torch

    from helpers import tiny_llama_lm
    from prune_callbacks.analysis import analyze

    model = tiny_llama_lm(seed=0)
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    a = analyze(model, [batch, batch], [batch], metric="perplexity", progress=False)
    heads = model.config.num_attention_heads
    assert all(len(v) == heads for v in a["head_importance"].values()) and a["head_importance"]
    assert len(a["head_names"]) == heads * model.config.num_hidden_layers
    assert a["baseline"] > 1.0


def test_goal_speed_writes_a_structured_slim_recipe_that_validates(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, tmp_path / "run"))
    out = tmp_path / "analysis"
    assert main(["analyze", str(recipe), "--output-dir", str(out), "--calibration-rows", "8", "--eval-rows", "8",
                 "--goal", "speed"]) == 0
    a = json.loads((out / "analysis.json").read_text())
    assert a["goal"] == "speed" and any(r["kind"] == "unstructured" for r in a["strategies"])
    assert (out / "strategies.png").stat().st_size > 0
    data = yaml.safe_load((out / "suggested.yaml").read_text())
    sections = data["pruning"] if isinstance(data["pruning"], list) else [data["pruning"]]
    assert {s["granularity"] for s in sections} <= {"ffn_neurons", "blocks"}
    assert data["output"]["slim"] is True and "save_sparse" not in data["output"]
    assert "Strategies at the same parameter budget" in (out / "ANALYSIS.md").read_text()
    assert main(["validate", str(out / "suggested.yaml")]) == 0


def test_unknown_goal_is_refused(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, tmp_path / "run"))
    with pytest.raises(SystemExit) as exc:
        main(["analyze", str(recipe), "--output-dir", str(tmp_path / "a"), "--goal", "fast"])
    assert exc.value.code == 2
    assert "invalid choice: 'fast'" in capsys.readouterr().err


def test_suggestion_keeps_the_set_overrides_it_was_analysed_with(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, tmp_path / "run"))
    out = tmp_path / "analysis"
    assert main(["analyze", str(recipe), "--output-dir", str(out), "--calibration-rows", "8", "--eval-rows", "8",
                 "--goal", "size", "--set", "pruning.final_sparsity=0.3", "--set", "training.learning_rate=0.002"]) == 0
    data = yaml.safe_load((out / "suggested.yaml").read_text())
    assert data["training"]["learning_rate"] == 0.002
    assert json.loads((out / "analysis.json").read_text())["budget"] == 0.3
