"""``pruning.accuracy_guard`` in a recipe, end to end through the CLI (tiny local BERT): the guard's answer and
trajectory land in report.json, REPORT.md, the plot and the summary; bad settings name the field."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
from recipe_fixtures import tiny_recipe, write_recipe  # noqa: E402

from prune_callbacks.cli import main  # noqa: E402
from prune_callbacks.recipe import RecipeError, load_recipe  # noqa: E402

GUARD = {"metric": "eval_accuracy", "max_drop": 0.05, "every": 2, "patience": 2}


def guarded(tmp_path, **guard):
    return tiny_recipe(tmp_path, tmp_path / "run", training={"max_steps": 12},
                       pruning={"final_sparsity": 0.9, "start_step": 1, "end_step": 8, "update_every": 1,
                                "accuracy_guard": {**GUARD, **guard}},
                       output={"dir": str(tmp_path / "run"), "plot": True})


def test_guarded_recipe_runs_and_reports_the_trajectory(tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", guarded(tmp_path))
    assert main(["finetune", str(path)]) == 0
    out = tmp_path / "run"
    report = json.loads((out / "report.json").read_text())
    (guard,) = report["accuracy_guard"]
    traj = guard["trajectory"]
    assert traj[0]["decision"] == "baseline" and traj[-1]["decision"] == "final"
    assert [r["step"] for r in traj[1:-1]] == list(range(2, 13, 2))  # every 2 optimizer steps once masks exist
    final = guard["final"]
    assert final["sparsity"] == traj[-1]["sparsity"]
    # the answer is the saved model: its pruned layers' zeros are at the guard's final sparsity
    assert report["sparsity"]["target_sparsity"] == pytest.approx(final["sparsity"], abs=0.01)
    md = (out / "REPORT.md").read_text()
    assert "## Accuracy guard" in md and f"| {traj[-1]['step']} | {final['sparsity']:.1%} |" in md
    assert (out / "sparsity.png").read_bytes()[:4] == b"\x89PNG"
    assert "guard        ended at" in capsys.readouterr().out


@pytest.mark.parametrize("guard, field", [({"max_drop": -0.5}, "max_drop"), ({"every": 0}, "every"),
                                          ({"metirc": "eval_accuracy"}, "metirc")])
def test_bad_guard_settings_name_the_field(tmp_path, guard, field):
    path = write_recipe(tmp_path / "r.yaml", guarded(tmp_path, **guard))
    with pytest.raises(RecipeError, match=rf"pruning\.accuracy_guard\.{field}"):
        load_recipe(path)


def test_metric_the_evaluation_never_returns_fails_before_training(tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", guarded(tmp_path, metric="eval_f1"))
    assert main(["finetune", str(path)]) == 2  # a setting to fix: the CLI's usage exit, one message, no traceback
    err = capsys.readouterr().err
    assert "accuracy_guard.metric='eval_f1'" in err and "eval_accuracy" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "report.json").exists()
