"""Latency probe (`prune_callbacks.analysis.latency`): slimmed depth + width plans timed against dense, the plan
chosen for a target speed-up, clear errors. Not timing-based: a deterministic ``time_one`` (seconds = parameter
count) stands in for the clock, so a plan's "speed-up" is its parameter ratio."""

import json
import math

import pytest
import torch
import yaml

from prune_callbacks.analysis import AnalysisError, analyze
from prune_callbacks.analysis import latency as lat
from prune_callbacks.analysis.latency import LatencyOptions, choose, latency_options
from prune_callbacks.analysis.report import markdown
from prune_callbacks.analysis.suggest import cut_blocks_at_once, suggest_pruning, suggested_recipe_yaml
from prune_callbacks.cli import main
from prune_callbacks.recipe.loading import load_recipe
from recipe_fixtures import tiny_recipe, write_recipe
from test_analysis_strategies import _bert, _cls_batches, _lm_batches, _llama


def fake_time(model, forward):
    """Deterministic 'seconds': the parameter count (the forward is not run)."""
    return float(sum(p.numel() for p in model.parameters()))


def _analysis(arch, target=None):
    model = _bert() if arch == "bert" else _llama()
    batches = _cls_batches() if arch == "bert" else _lm_batches(model)
    metric = "accuracy" if arch == "bert" else "perplexity"
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    a = analyze(model, batches, batches, metric=metric, progress=False, time_one=fake_time,
                latency=LatencyOptions(batch=2, seq=8, repeats=1, target_speedup=target))
    a["goal"] = "speed"
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())  # the probe slims copies only
    return a, model


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_probe_returns_a_speedup_for_every_plan(arch):
    a, model = _analysis(arch)
    rows = a["latency"]["rows"]
    names = {r["name"] for r in rows}
    assert {"ffn_neurons 50%", "ffn_neurons 75%", "blocks 1", "ffn_neurons 50% + blocks 2",
            "ffn_neurons 75% + blocks 2"} <= names
    assert ("ffn_neurons 50% + kv_groups 1" in names) == (arch == "llama")  # heads only where a config can say fewer
    dense = sum(p.numel() for p in model.parameters())
    for r in rows:
        assert r["speedup"] == pytest.approx(dense / r["params"]) and r["speedup"] > 1.0
        assert 0.0 < r["predicted_loss"] < 1.0 and len(r["blocks"]) == r["blocks_removed"]
    # more removed, more predicted loss: the predicted loss is a sum over removed units
    by = {r["name"]: r["predicted_loss"] for r in rows}
    assert by["ffn_neurons 25%"] < by["ffn_neurons 50%"] < by["ffn_neurons 75%"] < by["ffn_neurons 75% + blocks 1"]
    assert "chosen" not in a["latency"]  # no target: measured only


def test_blocks_removed_are_the_least_influential():
    a, _ = _analysis("bert")
    order = [b["name"] for b in sorted(a["blocks"], key=lambda b: b["influence"])]
    for r in a["latency"]["rows"]:
        assert sorted(r["blocks"]) == sorted(order[: r["blocks_removed"]])


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("target", [1.3, 2.0])
def test_chosen_plan_meets_the_target_with_the_fewest_blocks_then_least_predicted_loss(arch, target):
    a, _ = _analysis(arch, target)
    rows = a["latency"]["rows"]
    chosen = next(r for r in rows if r["name"] == a["latency"]["chosen"])
    fast = [r for r in rows if r["speedup"] >= target]
    assert chosen["speedup"] >= target
    assert chosen["blocks_removed"] == min(r["blocks_removed"] for r in fast)
    assert chosen["predicted_loss"] == min(r["predicted_loss"] for r in fast if r["blocks_removed"] == chosen["blocks_removed"])
    pruning, reasons = suggest_pruning(a)
    sections = pruning if isinstance(pruning, list) else [pruning]
    assert sections == chosen["configs"]
    assert any("measured speed-up" in r for r in reasons)
    assert "(chosen)" in markdown(a)


def test_no_plan_at_the_target_is_a_clear_error():
    a, _ = _analysis("bert", target=100.0)
    assert a["latency"]["chosen"] is None and "no plan reaches the target speed-up 100x" in a["latency"]["why"]
    with pytest.raises(AnalysisError, match="fastest measured"):
        suggest_pruning(a)
    assert "No suggested.yaml: no plan reaches" in markdown(a)


def test_choose_on_a_table():
    rows = [{"name": "a", "speedup": 3.2, "predicted_loss": 0.30}, {"name": "b", "speedup": 3.0, "predicted_loss": 0.2},
            {"name": "c", "speedup": 2.9, "predicted_loss": 0.01}, {"name": "d", "speedup": 3.0, "predicted_loss": 0.2}]
    assert choose(rows, 3.0)[0]["name"] == "b"  # c is cheaper but too slow; b before d on equal loss and speed
    assert choose(rows, 2.5)[0]["name"] == "c"
    assert choose(rows, 4.0)[0] is None and choose([], 2.0)[0] is None
    depth = [{"name": "blocks 2", "speedup": 2.3, "predicted_loss": 0.31, "blocks_removed": 2},
             {"name": "ffn 87.5%", "speedup": 2.2, "predicted_loss": 0.49, "blocks_removed": 0},
             {"name": "ffn 50% + blocks 1", "speedup": 2.0, "predicted_loss": 0.35, "blocks_removed": 1}]
    row, why = choose(depth, 2.0)
    assert row["name"] == "ffn 87.5%" and "fewest blocks removed (0)" in why  # depth last, then saliency
    assert choose(depth, 2.25)[0]["name"] == "blocks 2"  # only depth reaches it
    assert "within timing noise" not in why


def test_choose_names_a_shallower_plan_just_below_the_target():
    rows = [{"name": "ffn 62.5% + blocks 3", "speedup": 3.09, "predicted_loss": 0.63, "blocks_removed": 3},
            {"name": "ffn 87.5% + blocks 2", "speedup": 2.995, "predicted_loss": 0.65, "blocks_removed": 2},
            {"name": "ffn 87.5% + blocks 1", "speedup": 2.33, "predicted_loss": 0.56, "blocks_removed": 1}]
    row, why = choose(rows, 3.0)
    assert row["name"] == "ffn 62.5% + blocks 3"  # the choice itself is unchanged
    assert "ffn 87.5% + blocks 2 removes fewer blocks (2) and measured 3.00x, within timing noise" in why
    assert "--target-speedup 2.99" in why and choose(rows, 2.99)[0]["name"] == "ffn 87.5% + blocks 2"
    rows[1]["speedup"] = 2.84  # more than 5% below the target: not named
    assert choose(rows, 3.0)[0]["name"] == "ffn 62.5% + blocks 3" and "timing noise" not in choose(rows, 3.0)[1]


@pytest.mark.parametrize("kwargs,match", [
    ({"target_speedup": float("nan")}, "finite"), ({"target_speedup": float("inf")}, "finite"),
    ({"target_speedup": -2.0}, "must be > 1"), ({"target_speedup": 1.0}, "must be > 1"),
    ({"target_speedup": True}, "finite"), ({"batch": 0}, "batch=0"), ({"seq": -1}, "seq=-1"),
    ({"threads": 1.5}, "threads=1.5"), ({"repeats": True}, "repeats=True"),
])
def test_options_are_checked(kwargs, match):
    with pytest.raises(AnalysisError, match=match):
        LatencyOptions(**kwargs)


def test_options_that_do_not_apply_are_refused():
    assert latency_options("auto") is None and latency_options("speed", probe=False) is None
    assert latency_options("speed") == LatencyOptions()
    with pytest.raises(AnalysisError, match="target_speedup=2.0 does not apply with goal='size'"):
        latency_options("size", target_speedup=2.0)
    with pytest.raises(AnalysisError, match="latency_batch=8 does not apply with the latency probe turned off"):
        latency_options("speed", probe=False, batch=8)


def test_a_sequence_longer_than_the_model_is_refused_and_the_default_is_cut():
    model = _bert()  # 32 positions
    with pytest.raises(AnalysisError, match="longer than the model's 32 positions"):
        analyze(model, _cls_batches(), _cls_batches(), progress=False, latency=LatencyOptions(seq=64))
    assert lat.check_model(model, LatencyOptions()).seq == 32


@pytest.mark.parametrize("argv,message", [
    (["--goal", "size", "--target-speedup", "2"], "does not apply with goal='size'"),
    (["--goal", "speed", "--target-speedup", "nan"], "finite number > 1"),
    (["--goal", "speed", "--target-speedup", "0.5"], "must be > 1"),
    (["--goal", "speed", "--no-latency-probe", "--latency-threads", "2"], "latency probe turned off"),
])
def test_cli_refuses_bad_latency_options_before_loading(tmp_path, capsys, argv, message):
    missing = tmp_path / "no-such-recipe.yaml"  # never read: the options are checked first
    assert main(["analyze", str(missing), "--output-dir", str(tmp_path / "a"), *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--latency-batch", "-1"], ["--latency-seq", "0"], ["--target-speedup", "x"]])
def test_cli_parsing_refuses_non_numbers(tmp_path, capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(["analyze", "r.yaml", "--output-dir", str(tmp_path), "--goal", "speed", *argv])
    assert exc.value.code == 2


def test_cli_target_speedup_writes_a_depth_width_recipe_that_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(lat, "default_time_one", fake_time)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, tmp_path / "run"))
    out = tmp_path / "analysis"
    assert main(["analyze", str(recipe), "--output-dir", str(out), "--calibration-rows", "8", "--eval-rows", "8",
                 "--goal", "speed", "--target-speedup", "1.02", "--latency-batch", "2", "--latency-seq", "8",
                 "--latency-repeats", "1"]) == 0
    a = json.loads((out / "analysis.json").read_text())
    assert a["latency"]["batch"] == 2 and a["latency"]["seq"] == 8 and a["latency"]["threads"] == 1
    chosen = next(r for r in a["latency"]["rows"] if r["name"] == a["latency"]["chosen"])
    assert chosen["speedup"] >= 1.02 and math.isfinite(chosen["predicted_loss"])
    text = (out / "suggested.yaml").read_text()
    assert "measured speed-up" in text and "Latency probe" in (out / "ANALYSIS.md").read_text()
    data = yaml.safe_load(text)
    sections = data["pruning"] if isinstance(data["pruning"], list) else [data["pruning"]]
    assert [{k: s[k] for k in c} for s, c in zip(sections, chosen["configs"])] == chosen["configs"]
    assert data["output"]["slim"] is True
    load_recipe(out / "suggested.yaml")
    assert main(["validate", str(out / "suggested.yaml"), "--load"]) == 0


def test_cli_target_nobody_reaches_exits_2_and_keeps_the_figures(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(lat, "default_time_one", fake_time)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, tmp_path / "run"))
    out = tmp_path / "analysis"
    assert main(["analyze", str(recipe), "--output-dir", str(out), "--calibration-rows", "8", "--eval-rows", "8",
                 "--goal", "speed", "--target-speedup", "50", "--latency-batch", "2", "--latency-seq", "8",
                 "--latency-repeats", "1"]) == 2
    assert "no plan reaches the target speed-up 50x" in capsys.readouterr().err
    assert (out / "analysis.json").is_file() and not (out / "suggested.yaml").exists()


def test_goal_auto_runs_no_latency_probe(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, tmp_path / "run"))
    out = tmp_path / "analysis"
    assert main(["analyze", str(recipe), "--output-dir", str(out), "--calibration-rows", "8", "--eval-rows", "8"]) == 0
    assert "latency" not in json.loads((out / "analysis.json").read_text())


def test_goal_speed_without_a_target_quotes_the_chosen_strategy_speedup():
    a, _ = _analysis("bert")
    pruning, reasons = suggest_pruning(a)
    sections = pruning if isinstance(pruning, list) else [pruning]
    row = next(r for r in a["latency"]["rows"] if sorted(map(str, r["configs"])) == sorted(map(str, sections)))
    assert f"measured {row['speedup']:.2f}x" in next(r for r in reasons if r.startswith("latency probe:"))


WINDOWS = [  # (the recipe's window, the one-shot step of its blocks)
    ({"start_step": 0.1, "end_step": 0.6}, 0.35),
    ({"start_step": 10, "end_step": 61}, 35),
    ({"start_step": 10, "end_step": 0.6}, 10),  # an int and a fraction: at the window's start
    ({}, 0.4),  # PruningConfig's window, 0.1 to 0.7
]


@pytest.mark.parametrize("window,at", WINDOWS)
@pytest.mark.parametrize("refusal", [None, "merge with granularity='blocks' cannot fold these blocks: x"])
def test_blocks_are_cut_at_once_mid_window_and_folded_where_they_fold(window, at, refusal):
    configs = [{"granularity": "ffn_neurons", "final_sparsity": 0.875, "update_every": 10, **window},
               {"granularity": "blocks", "final_sparsity": 0.3333, "update_every": 10, "schedule": "cubic", **window}]
    ffn = dict(configs[0])
    reasons = cut_blocks_at_once(configs, {"blocks_fold_refusal": refusal})
    assert configs[0] == ffn  # width configs keep the recipe's window
    blocks = {"granularity": "blocks", "final_sparsity": 0.3333, "schedule": "oneshot", "start_step": at}
    assert configs[1] == (blocks if refusal else {**blocks, "merge": True})
    assert len(reasons) == 1 and (refusal or "merge: true") in reasons[0] and f"at {at} " in reasons[0]


def test_an_analysis_without_the_fold_check_drops_the_blocks():
    configs = [{"granularity": "blocks", "final_sparsity": 0.5}]
    reasons = cut_blocks_at_once(configs, {})
    assert "merge" not in configs[0] and "did not check whether the blocks fold" in reasons[0]


def test_a_suggested_plan_with_blocks_loads_with_its_blocks_one_shot_and_folded(tmp_path):
    """On BERT (post-LN); which families fold is tested over the support table in test_merge_blocks.py."""
    a, _ = _analysis("bert")
    assert a["blocks_fold_refusal"] is None
    rows = a["latency"]["rows"]
    target = max(r["speedup"] for r in rows if not r["blocks_removed"]) * 1.001  # only plans with blocks reach it
    row, why = choose(rows, target)
    assert row is not None and row["blocks_removed"] > 0
    a["latency"].update(target_speedup=target, chosen=row["name"], why=why)
    recipe = yaml.safe_load(write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, tmp_path / "run")).read_text())
    text = suggested_recipe_yaml(recipe, a)
    data = yaml.safe_load(text)
    blocks = next(c for c in data["pruning"] if c["granularity"] == "blocks")
    assert blocks["schedule"] == "oneshot" and blocks["merge"] is True and "end_step" not in blocks
    assert "folded into the kept block before them" in text
    (tmp_path / "s.yaml").write_text(text)
    load_recipe(tmp_path / "s.yaml")
    assert ("- blocks: suggested.yaml removes them at once, in the middle of the analysed recipe's pruning window, "
            "folded into the kept block before them (merge: true)") in markdown(a)
    a["blocks_fold_refusal"] = "no fold here"
    assert "window, dropped (no merge: no fold here)" in markdown(a)
