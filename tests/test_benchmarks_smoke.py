"""Tiny smoke runs of the benchmark scripts (``--smoke``: a tiny BERT from a config, no asset).

The real settings are scripts run by hand (see BENCHMARKS.md); CI only checks
that each script runs end to end and writes well-formed results.
"""

from __future__ import annotations

import json

import pytest
import torch




def test_quality_smoke(tmp_path):
    from benchmarks import quality

    out = tmp_path / "quality_smoke.json"
    res = quality.main(["--smoke", "--methods", "dense", "taylor", "magnitude_per_layer", "torch_ao",
                        "--sparsities", "0.9", "--out", str(out), "--plot"])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(res))
    names = {r["name"] for r in data["runs"]}
    assert names == {"dense", "taylor", "magnitude_per_layer", "torch_ao"}
    for r in data["runs"]:
        assert 0.0 <= r["test_accuracy"] <= 1.0 and "test_retention_pct" in r
        if r["name"] != "dense":
            assert r["achieved_sparsity"] == pytest.approx(0.9, abs=0.01)
    assert data["hardware"]["torch"] == torch.__version__
    assert out.with_suffix(".png").stat().st_size > 0


def test_quality_queue_merge(tmp_path):
    from benchmarks import plot, quality

    args = ["--smoke", "--queue", "--methods", "dense", "taylor", "taylor_cap0.98", "--sparsities", "0.9",
            "--claim-dir", str(tmp_path / "claims")]
    quality.main(args + ["--out", str(tmp_path / "w0.json")])
    quality.main(args + ["--out", str(tmp_path / "w1.json")])  # everything already claimed: runs nothing
    out = tmp_path / "quality_smoke.json"
    quality.main(["--merge", str(tmp_path / "w0.json"), str(tmp_path / "w1.json"), "--out", str(out)])
    grid = json.loads(out.read_text())
    ablation = json.loads((tmp_path / "quality_smoke_ablation.json").read_text())
    assert [r["name"] for r in grid["runs"]] == ["dense", "taylor"]
    assert [r["name"] for r in ablation["runs"]] == ["taylor_cap0.98"]
    assert ablation["runs"][0]["max_layer_sparsity"] <= 0.98 + 1e-6
    assert "taylor_cap0.98" in plot.ablation_table(tmp_path / "quality_smoke_ablation.json", out)



def test_lm_token_plot_pairs_each_row_with_its_seeds_dense_and_keeps_the_later_run(tmp_path):
    """The SmolLM2 tokens plot: gaps to the dense model of the same seed and tokens; a row rerun later replaces the
    earlier one; rows with a lever (teacher, rate after the cut, another window) are not the plain variants."""
    from benchmarks import plot

    def write(name, seed, tokens, date, rows):
        (tmp_path / name).write_text(json.dumps({"budget": {"seed": seed, "tokens": tokens},
                                                 "hardware": {"date": date}, "rows": rows}))

    def row(variant, ppl, **kw):
        return {"variant": variant, "perplexity": ppl, "window": [0.1, 0.6], "distillation": None, **kw}

    write("structured_lm_a.json", 0, 100, "2026-01-01", [row("dense", 10.0), row("ffn25", 13.0),
                                                           row("ffn25+merge", 12.5)])
    write("structured_lm_0.json", 0, 100, "2026-02-01", [row("ffn25+merge", 12.0)])  # read first, run later: wins
    write("structured_lm_c.json", 0, 500, "2026-01-01", [row("dense", 8.0), row("ffn25", 9.0),
                                                           row("ffn25/rlr2", 1.0, recovery_lr_scale=2.0),
                                                           row("ffn25@0.4-0.8", 1.0, window=[0.4, 0.8])])
    write("structured_lm_d.json", 1, 100, "2026-01-01", [row("dense/s1", 20.0), row("ffn25/s1", 30.0),
                                                           row("ffn25+kd/s1", 1.0, distillation={"x": 1})])
    points = plot.lm_token_points(tmp_path)
    assert points == {(0, "dense"): {100: 10.0, 500: 8.0}, (0, "ffn25"): {100: 13.0, 500: 9.0},
                      (0, "ffn25+merge"): {100: 12.0}, (1, "dense"): {100: 20.0}, (1, "ffn25"): {100: 30.0}}
    table = plot.plot_lm_tokens(tmp_path, tmp_path / "t.png")
    assert "| 0 | ffn25 | +30.0% | +12.5% |" in table and "| 1 | ffn25 | +50.0% |  |" in table
    assert "| 0 | ffn25+merge | +20.0% |  |" in table and (tmp_path / "t.png").stat().st_size > 0


def test_structured_lm_merge_puts_runs_side_by_side(tmp_path):
    """``structured_lm.py --merge``: one file from parallel runs (the first row of a variant wins; each part's
    hardware kept)."""
    from benchmarks import structured_lm

    parts = []
    for i, rows in enumerate([[{"variant": "dense", "perplexity": 1.0}], [{"variant": "ffn25", "perplexity": 2.0},
                                                                          {"variant": "dense", "perplexity": 9.0}]]):
        parts.append(tmp_path / f"p{i}.json")
        parts[-1].write_text(json.dumps({"budget": {"seed": 0}, "hardware": {"date": str(i)}, "rows": rows}))
    merged = structured_lm.main(["--merge", *map(str, parts), "--out", str(tmp_path / "m.json")])
    assert merged == json.loads((tmp_path / "m.json").read_text())
    assert [(r["variant"], r["perplexity"]) for r in merged["rows"]] == [("dense", 1.0), ("ffn25", 2.0)]
    assert merged["merged_from"] == ["p0.json", "p1.json"] and merged["hardware_per_part"] == [{"date": "0"}, {"date": "1"}]

def test_overhead_smoke(tmp_path):
    from benchmarks import overhead, plot

    out = tmp_path / "overhead_cpu.json"
    overhead.main(["--smoke", "--out", str(out)])
    row = json.loads(out.read_text())["models"]["tiny"]
    assert set(row["interleaved"]["variants"]) == {"taylor", "taylor@v1", "platon", "movement", "magnitude"}
    assert all(v["ratio"] > 0 for v in row["interleaved"]["variants"].values())
    mem = row["memory"]
    for method in ("taylor", "platon", "movement", "magnitude"):  # exact buffer bytes match the documented table
        assert mem[method]["steady_bytes_per_param"] == mem[method]["documented_BYTES_PER_PARAM_plus_mask"]
    assert {"global", "per_layer"} <= set(row["mask_update"])
    plot.plot_overhead(out, tmp_path / "o.png")


def test_size_smoke(tmp_path):
    from benchmarks import plot, size

    out = tmp_path / "size.json"
    size.main(["--smoke", "--sparsities", "0.9", "--dtypes", "fp32", "bf16", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    for dtype in ("fp32", "bf16"):
        dense = next(r for r in rows if r["dtype"] == dtype and r["kind"] == "dense")
        fin = next(r for r in rows if r["dtype"] == dtype and r["kind"] == "finalized")
        sparse = next(r for r in rows if r["dtype"] == dtype and r["kind"] == "sparse")
        assert fin["weights_bytes"] == pytest.approx(dense["weights_bytes"], rel=0.01)
        if not sparse.get("pending"):
            assert sparse["weights_bytes"] < dense["weights_bytes"]
    assert "| fp32 | 90% |" in plot.size_table(out)


def test_structured_accuracy_smoke_with_and_without_distillation(tmp_path):
    from benchmarks import structured_accuracy

    out = tmp_path / "acc.json"
    res = structured_accuracy.main(["--smoke", "--steps", "8", "--variants", "dense", "ffn50", "ffn50+kd",
                                    "--save-dense", str(tmp_path / "dense"), "--dense-from", str(tmp_path / "dense"),
                                    "--out", str(out)])
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows.keys() == {"dense", "ffn50", "ffn50+kd"} and res["rows"][2]["distillation"]["hardness"] == 1.0
    assert rows["ffn50"]["config_changes"] == rows["ffn50+kd"]["config_changes"] == {"intermediate_size": [48, 24]}
    assert all(r["test_accuracy"] == r["masked_test_accuracy"] for r in rows.values())  # slim == masked


def test_structured_lm_smoke_trains_slims_reloads_and_times(tmp_path):
    from benchmarks import structured_lm

    out = tmp_path / "lm.json"
    args = ["--smoke", "--steps", "4", "--eval-blocks", "4", "--out", str(out), "--models-dir", str(tmp_path / "m")]
    structured_lm.main([*args, "--train", "dense", "ffn50", "kv1", "blocks6"])
    data = structured_lm.main([*args, "--latency", "--rounds1", "1", "--rounds8", "1"])
    rows = {r["variant"]: r for r in data["rows"]}
    assert rows["kv1"]["config_changes"] == {"num_attention_heads": [4, 2], "num_key_value_heads": [2, 1]}
    assert rows["blocks6"]["config_changes"] == {"num_hidden_layers": [2, 1]}
    assert all(r["reload_max_abs_logit_diff"] <= 1e-5 and r["b1_median_s"] > 0 for r in rows.values())
    assert rows["dense"]["b8_speedup"] == 1.0 and out.with_suffix(".png").is_file()


def test_speed_plan_accuracy_smoke_chooses_by_the_library_rule(tmp_path):
    from benchmarks import speed_plan_accuracy

    data = speed_plan_accuracy.main(["--smoke", "--out", str(tmp_path / "s.json")])
    rows = {r["variant"]: r for r in data["rows"]}
    assert set(rows) == {"dense", "x3", "x2"}
    assert rows["x3"]["plan"] == rows["x2"]["plan"] == "ffn_neurons 75%"  # least predicted loss at both targets
    assert rows["x3"]["params"] < rows["dense"]["params"] and rows["x3"]["test_accuracy"] == rows["x3"]["masked_test_accuracy"]



def test_speed_plan_saliency_reaches_every_config_and_names_the_row(tmp_path):
    from benchmarks import speed_plan_accuracy

    data = speed_plan_accuracy.main(["--smoke", "--targets", "3", "--only", "dense", "x3", "--saliency", "unit_taylor",
                                     "--beta", "0.95", "--out", str(tmp_path / "s.json")])
    rows = {r["variant"]: r for r in data["rows"]}
    assert set(rows) == {"dense", "x3/unit_taylor/b0.95"}  # the name of pruned rows only
    assert rows["dense"]["saliency"] is None and rows["x3/unit_taylor/b0.95"]["saliency"] == "unit_taylor"
    assert rows["x3/unit_taylor/b0.95"]["beta"] == 0.95 and rows["dense"]["beta"] is None


def test_speed_plan_levers_smoke_late_window_and_in_run_teacher(tmp_path):
    from benchmarks import speed_plan_accuracy

    data = speed_plan_accuracy.main(["--smoke", "--targets", "2", "--only", "dense", "x2+self", "--window", "0.5", "0.75",
                                     "--hidden-weight", "1", "--out", str(tmp_path / "s.json")])
    rows = {r["variant"]: r for r in data["rows"]}
    assert set(rows) == {"dense", "x2@0.5-0.75+self/h1"}  # the window names pruned rows only
    teacher = rows["x2@0.5-0.75+self/h1"]["distillation"]
    assert teacher["teacher"] == "self, copied after step 1" and teacher["hidden_weight"] == 1.0  # 4 steps: 1 dense
    assert rows["x2@0.5-0.75+self/h1"]["plan"] == "ffn_neurons 75%"


def test_speed_plan_seed_reaches_head_batches_and_label(tmp_path, monkeypatch):
    """``--seed N`` draws the head, the batch order and dropout (the split stays fixed) and names the row ``/sN``."""
    from benchmarks import common, speed_plan_accuracy

    seen = []
    real_batches, real_seed = common.train_batches, common.seed_everything
    monkeypatch.setattr(common, "train_batches", lambda *a, **k: seen.append(("batches", k["seed"])) or real_batches(*a, **k))
    monkeypatch.setattr(common, "seed_everything", lambda s: seen.append(("torch", s)) or real_seed(s))
    data = speed_plan_accuracy.main(["--smoke", "--targets", "2", "--only", "x2", "--seed", "3",
                                     "--out", str(tmp_path / "s.json")])
    (row,) = data["rows"]
    assert row["variant"] == "x2/s3" and row["seed"] == 3 and data["seed"] == 3
    assert ("torch", 3) in seen and ("batches", 3) in seen and ("batches", 0) not in seen


def test_speed_plan_fine_tuned_teacher_smoke(tmp_path):
    """``--save-dense`` keeps the dense row's model; ``+kd`` rows distil from it (``--dense-from``)."""
    from benchmarks import speed_plan_accuracy

    dense_dir = tmp_path / "dense"
    speed_plan_accuracy.main(["--smoke", "--only", "dense", "--save-dense", str(dense_dir), "--out", str(tmp_path / "d.json")])
    assert (dense_dir / "config.json").is_file()
    data = speed_plan_accuracy.main(["--smoke", "--targets", "3", "--only", "x3+kd", "--dense-from", str(dense_dir),
                                     "--out", str(tmp_path / "k.json")])
    (row,) = data["rows"]
    assert row["variant"] == "x3+kd" and row["distillation"]["teacher"] == "dense fine-tune"
    assert row["plan"] == "ffn_neurons 75%" and row["distillation"]["hidden_weight"] == 0.0
    # with blocks cut and the hidden-state term on (layer-wise distillation of the cut)
    data = speed_plan_accuracy.main(["--smoke", "--targets", "3", "--only", "half+kd", "--plan", "half=blocks:0.5",
                                     "--hidden-weight", "1", "--dense-from", str(dense_dir), "--out", str(tmp_path / "h.json")])
    (row,) = data["rows"]
    assert row["variant"] == "half+kd/h1" and row["distillation"]["hidden_weight"] == 1.0
    assert row["config_changes"] == {"num_hidden_layers": [6, 3]}


def test_structured_lm_levers_smoke_merge_and_in_run_teacher(tmp_path):
    from benchmarks import structured_lm

    out = tmp_path / "lm.json"
    structured_lm.main(["--smoke", "--steps", "4", "--eval-blocks", "2", "--out", str(out), "--models-dir",
                        str(tmp_path / "m"), "--window", "0.5", "1.0", "--train", "ffn25+merge+select+self"])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["variant"] == "ffn25+merge+select+self@0.5-1" and row["distillation"]["teacher"].startswith("self")
    assert row["merge"] and row["select"] and all(r["select"] == "fold" for r in row["merge_report"])
    assert row["config_changes"] == {"intermediate_size": [64, 48]} and row["reload_max_abs_logit_diff"] <= 1e-5
    with pytest.raises(SystemExit, match="exclude each other"):
        structured_lm._kinds("ffn25+kd+self")


def test_structured_lm_recovery_lr_scale_names_and_records_the_row(tmp_path):
    from benchmarks import structured_lm

    out = tmp_path / "lm.json"
    args = ["--smoke", "--steps", "8", "--eval-blocks", "2", "--out", str(out), "--models-dir", str(tmp_path / "m")]
    structured_lm.main([*args, "--recovery-lr-scale", "2", "--train", "dense", "ffn25"])
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["dense"]["recovery_lr_scale"] is None  # nothing is cut: nothing to recover, the name says so too
    assert rows["ffn25/rlr2"]["recovery_lr_scale"] == 2.0
    with pytest.raises(SystemExit):  # the library's own rule, before any model is built
        structured_lm.main([*args, "--recovery-lr-scale", "0", "--train", "ffn25"])


def test_structured_lm_saliency_names_and_records_the_row(tmp_path):
    from benchmarks import structured_lm

    out = tmp_path / "lm.json"
    structured_lm.main(["--smoke", "--steps", "4", "--eval-blocks", "2", "--out", str(out), "--models-dir",
                        str(tmp_path / "m"), "--saliency", "platon", "--train", "dense", "ffn25"])
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["dense"]["saliency"] is None and rows["ffn25/platon"]["saliency"] == "platon"
    with pytest.raises(SystemExit):  # a name the library's registry does not hold
        structured_lm.main(["--smoke", "--saliency", "no-such", "--train", "ffn25", "--out", str(out)])


def test_structured_lm_kd_from_the_dense_row_names_and_records_its_teacher(tmp_path):
    from benchmarks import structured_lm

    out, models = tmp_path / "lm.json", tmp_path / "m"
    args = ["--smoke", "--steps", "4", "--eval-blocks", "2", "--out", str(out), "--models-dir", str(models)]
    with pytest.raises(SystemExit, match="no saved model"):
        structured_lm.main([*args, "--train", "ffn25+kd", "--dense-from", str(models / "dense")])
    structured_lm.main([*args, "--train", "dense"])
    structured_lm.main([*args, "--train", "ffn25+kd", "--dense-from", str(models / "dense"), "--hardness", "1",
                        "--hidden-weight", "0.5"])
    row = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}["ffn25+kd/ft-teacher-h1-hw0.5"]
    assert row["distillation"]["hardness"] == 1.0 and row["distillation"]["hidden_weight"] == 0.5
    assert str(models / "dense") in row["distillation"]["teacher"] and row["reload_max_abs_logit_diff"] <= 1e-5
    with pytest.raises(SystemExit, match="seed 0 there, 1 here"):  # other held-out blocks: refused before compute
        structured_lm.main([*args, "--train", "dense", "--seed", "1"])
    structured_lm.main([*args, "--train", "dense", "--seed", "1", "--out", str(tmp_path / "s1.json")])
    assert (models / "dense" / "s1" / "config.json").is_file() and (models / "dense" / "config.json").is_file()


def test_saved_model_ready_waits_for_a_parallel_writer_and_gives_up_in_time(tmp_path):
    import threading

    from benchmarks import common

    folder = tmp_path / "dense"
    assert not common.saved_model_ready(folder)  # no folder at all: no wait by default
    assert not common.saved_model_ready(folder, wait_s=0.05)
    folder.mkdir()
    writer = threading.Timer(0.05, (folder / "config.json").write_text, args=("{}",))
    writer.start()
    assert common.saved_model_ready(folder, wait_s=2.0)  # written while it waited
    writer.join()


def test_merge_units_smoke_pairs_drop_and_merge_on_the_same_neurons(tmp_path):
    from benchmarks import merge_units

    out = tmp_path / "mu.json"
    res = merge_units.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text())["dense_steps"] == 4 and out.with_suffix(".md").is_file()
    assert [(r["ffn_fraction_removed"], r["merge"]) for r in res["rows"]] == [(0.5, False), (0.5, True),
                                                                              (0.75, False), (0.75, True)]
    assert all(p["same_neurons_removed"] for p in res["paired"]) and len(res["paired"]) == 2
    for r in res["rows"]:  # the tiny model has 2 blocks of 48 neurons: the merge folds exactly the removed ones
        assert (r["merge_report"] is None) != r["merge"]
        if r["merge"]:
            assert r["merge_report"]["neurons"] == round(r["ffn_fraction_removed"] * 96)
            assert all(-1e-4 <= x <= 1 + 1e-4 for x in r["merge_report"]["recovered"])  # a ridge fit never adds


def test_structured_latency_smoke_slims_exactly_and_times_every_variant(tmp_path):
    from benchmarks import structured_latency

    out = tmp_path / "sl.json"
    structured_latency.main(["--smoke", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["variant"] == "dense" and rows[0]["params_ratio"] == 1.0 and len(rows) > 3
    for r in rows[1:]:  # every slim model answers as its masked twin, is smaller and was timed
        assert r["masked_vs_slim_max_abs_diff"] <= 1e-5 and r["params_ratio"] < 1.0
        assert r["b1_median_s"] > 0 and r["b32_median_s"] > 0
    structured_latency.main(["--smoke", "--variants", "ffn75+blocks2", "--out", str(out)])
    assert [r["variant"] for r in json.loads(out.read_text())["rows"]] == ["dense", "ffn75+blocks2"]


def test_structured_latency_runs_in_fresh_processes(tmp_path):
    """``--runs N``: N processes, each run's speed-up kept, the median reported, and the time of every variant
    against the first slim one timed in the same rounds."""
    from benchmarks import structured_latency

    out = tmp_path / "runs.json"
    data = structured_latency.main(["--smoke", "--variants", "ffn75+blocks2", "ffn50", "--runs", "2", "--out", str(out)])
    assert data["runs"] == 2 and data["reference"] == "ffn75+blocks2"
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["dense", "ffn75+blocks2", "ffn50"]
    for r in rows.values():
        assert len(r["b32_speedup_runs"]) == 2 and r["b32_speedup"] == pytest.approx(sum(r["b32_speedup_runs"]) / 2)
    assert rows["ffn75+blocks2"]["b32_time_vs_ffn75+blocks2_runs"] == [1.0, 1.0]
    assert rows["dense"]["b32_speedup_runs"] == [1.0, 1.0]
    with pytest.raises(SystemExit):
        structured_latency.main(["--smoke", "--runs", "0", "--out", str(out)])


def test_low_rank_smoke_sweeps_sparsities_and_times_exported_models(tmp_path):
    from benchmarks import low_rank

    out = tmp_path / "lr.json"
    res = low_rank.main(["--smoke", "--sparsity", "0.25", "0.5", "--latency", "--variants", "low_rank_relative_late50",
                         "dense", "svd_after", "fwsvd_relative_after", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows].count("dense") == 1 and len(rows) == 7  # one dense fine-tune, shared
    pruned = [r for r in rows if r["variant"] != "dense"]
    for r in pruned:  # every exported row removes its budget (< one rank step over) and is timed
        assert r["sparsity"] <= r["removed_fraction"] < r["sparsity"] + 0.05 and r["params_after"] < r["params_before"]
        assert res["latency"]["b1_median_s"][f"{r['variant']}@{r['sparsity']}"] > 0
    assert pruned[0]["window"] == [0.5, 0.8] and len(res["latency"]["b32_median_s"]) == 7
    # timing from the result file alone: the same shapes, so the same parameter counts
    again = low_rank.main(["--smoke", "--latency-from", str(out), "--variants", "low_rank_relative_late50", "svd_after",
                           "fwsvd_relative_after", "--out", str(tmp_path / "lat.json")])
    assert again["latency"]["params"] == res["latency"]["params"]


def test_low_rank_lm_smoke_targets_query_key_only(tmp_path):
    from benchmarks import low_rank_lm

    out = tmp_path / "lrlm.json"
    low_rank_lm.main(["--smoke", "--sparsity", "0.5", "--variants", "pretrained", "dense", "svd_after",
                      "fwsvd_relative_after", "low_rank_relative_late50", "--out", str(out)])
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows.keys() == {"pretrained", "dense", "svd_after", "fwsvd_relative_after", "low_rank_relative_late50"}
    for name in ("svd_after", "fwsvd_relative_after", "low_rank_relative_late50"):
        assert set(rows[name]["ranks"]) and all(k.endswith(("q_proj", "k_proj")) for k in rows[name]["ranks"])
        assert rows[name]["removed_fraction"] >= 0.5 and rows[name]["held_out_ppl"] == pytest.approx(rows[name]["projected_ppl"], rel=1e-4)


def test_merge_blocks_fold_brings_the_cut_model_closer_to_the_dense_one(tmp_path):
    """The fold refits the kept block before a removed run so that the cut model's last hidden state is nearer the
    dense model's than dropping gives (the calibration batches themselves: a least-squares fit cannot do worse there
    than the projection it replaces, up to the ridge); and the smoke run pairs drop / fold on the same blocks."""
    import copy

    from benchmarks import common, merge_blocks

    torch.manual_seed(0)
    dense = common.classifier_from_config(common.tiny_bert_config(num_hidden_layers=3)).eval()
    data = common.synthetic_encoded(64, seed=0)
    batches = common.train_batches(data, steps=4, batch_size=16, seed=0)

    def last_states(model):
        with torch.no_grad():
            return torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                    output_hidden_states=True).hidden_states[-1][b["attention_mask"].bool()]
                              for b in batches])

    want = last_states(dense)
    errors = {}
    for fold in (False, True):
        model = copy.deepcopy(dense)
        if fold:
            info = merge_blocks.fold_run(model, [2], batches, damping=1e-6)
            assert info["into"] == 1 and info["tokens"] == sum(int(b["attention_mask"].sum()) for b in batches)
        merge_blocks.cut(model, [2])
        assert len(model.bert.encoder.layer) == 2 and model.config.num_hidden_layers == 2
        errors[fold] = float((last_states(model) - want).pow(2).mean())
    assert errors[True] < 0.5 * errors[False]
    assert merge_blocks.runs_of([4, 1, 3]) == [[1], [3, 4]]

    out = tmp_path / "mb.json"
    res = merge_blocks.main(["--smoke", "--out", str(out)])
    assert [(r["removed_blocks"], r["fold"]) for r in res["rows"]][:2] == [(res["paired"][0]["removed_blocks"], False),
                                                                          (res["paired"][0]["removed_blocks"], True)]
    merge_blocks.main(["--pool", str(out), str(out), "--out", str(tmp_path / "p.json")])
    assert [r["blocks_removed"] for r in json.loads((tmp_path / "p.json").read_text())["rows"]] == [1, 2]
    given = merge_blocks.main(["--smoke", "--removed", "1,3", "--out", str(tmp_path / "g.json")])
    assert [(p["removed_blocks"], p["chosen_by"]) for p in given["paired"]] == [([1, 3], "--removed")]
    assert [f["into"] for f in given["rows"][1]["folds"]] == [0, 2]  # two runs, each into the block before it


def test_speed_plan_fold_levers_smoke(tmp_path):
    """--fold / --fold-select / --blocks-oneshot reach the Pruner (merge reports) and name the row."""
    from benchmarks import speed_plan_accuracy

    data = speed_plan_accuracy.main(["--smoke", "--only", "mix", "--plan", "mix=ffn_neurons:0.5,blocks:0.5",
                                     "--fold", "ffn_neurons", "blocks", "--fold-select", "fold", "--blocks-oneshot",
                                     "0.3", "--out", str(tmp_path / "f.json")])
    row = data["rows"][-1]
    assert row["variant"] == "mix/blocks@0.3/fold=ffn_neurons,blocks/fold"
    ffn, blocks = row["merge"]
    assert ffn["select"] == "fold" and ffn["updates"] >= 1 and ffn["neurons"] > 0
    assert blocks["select"] == "fold" and blocks["updates"] == 1 and blocks["blocks"] >= 1


def test_warm_restart_schedule():
    """Until the cut the rate follows linear_warmup_decay; from it, the same shape again up to ``peak`` times the base."""
    import torch

    from benchmarks import common

    def rates(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched, out = make(opt), []
        for _ in range(20):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    plain = rates(lambda o: common.linear_warmup_decay(o, steps=20, warmup=2))
    again = rates(lambda o: common.warm_restart(o, steps=20, warmup=2, at=10, peak=3.0))
    assert again[:10] == plain[:10] and plain[:3] == [0.5, 1.0, 1.0] and plain[10] == pytest.approx(10 / 18)
    assert again[10:13] == pytest.approx([3.0, 3.0, 3.0 * 8 / 9]) and again[-1] == pytest.approx(3.0 / 9)


def test_speed_plan_slim_lr_smoke(tmp_path, capsys):
    """--slim-lr restarts the schedule where the blocks are cut, or at --slim-lr-at, and names the row /slrX[@F];
    without either it is refused before any training, as is a --slim-lr-at outside the run."""
    from benchmarks import speed_plan_accuracy

    base = ["--smoke", "--only", "mix", "--plan", "mix=ffn_neurons:0.5,blocks:0.5", "--slim-lr", "1e-4"]
    data = speed_plan_accuracy.main([*base, "--blocks-oneshot", "0.5", "--out", str(tmp_path / "s.json")])
    row = data["rows"][-1]
    assert row["variant"] == "mix/blocks@0.5/slr0.0001" and row["slim_lr"] == 1e-4
    with pytest.raises(SystemExit):
        speed_plan_accuracy.main([*base, "--out", str(tmp_path / "t.json")])
    assert "--slim-lr 0.0001 applies from the step the blocks are cut" in capsys.readouterr().err
    at = speed_plan_accuracy.main(["--smoke", "--only", "w", "--plan", "w=ffn_neurons:0.5", "--slim-lr", "1e-4",
                                   "--slim-lr-at", "0.5", "--out", str(tmp_path / "a.json")])
    assert at["rows"][-1]["variant"] == "w/slr0.0001@0.5" and at["rows"][-1]["slim_lr_at"] == 0.5
    with pytest.raises(SystemExit):
        speed_plan_accuracy.main([*base, "--slim-lr-at", "1.5", "--out", str(tmp_path / "u.json")])
    assert "--slim-lr-at 1.5: a fraction of the run in (0, 1)" in capsys.readouterr().err
    lib = speed_plan_accuracy.main(["--smoke", "--only", "mix", "--plan", "mix=ffn_neurons:0.5,blocks:0.5",
                                    "--blocks-oneshot", "0.5", "--recovery-lr-scale", "2", "--out", str(tmp_path / "r.json")])
    assert lib["rows"][-1]["variant"] == "mix/blocks@0.5/rlr2" and lib["rows"][-1]["recovery_lr_scale"] == 2
    with pytest.raises(SystemExit):
        speed_plan_accuracy.main(["--smoke", "--recovery-lr-scale", "0", "--out", str(tmp_path / "z.json")])
    assert "a learning-rate multiple must be > 0" in capsys.readouterr().err


def test_merge_blocks_engine_smoke(tmp_path):
    from benchmarks import merge_blocks

    data = merge_blocks.main(["--smoke", "--engine", "--select", "fold", "--out", str(tmp_path / "m.json")])
    engine = [r for r in data["rows"] if r["engine"]]
    assert engine and all(r["folds"][0]["select"] == "fold" for r in engine)
    for pair in data["paired"]:  # the drop row removes the blocks the engine chose
        same = [r for r in data["rows"] if r["removed_blocks"] == pair["removed_blocks"]]
        assert sorted(r["fold"] for r in same) == [False, True] and pair["chosen_by"] == "library (merge.select=fold)"


def test_width_cut_is_exact_at_full_width_and_runs_a_cut(tmp_path):
    """The width cut keeps a model unchanged when it keeps every channel, dimension, neuron and block (the slicing
    rules cover every tensor and the head-size scale is 1); a real cut trains on, its optimizer moments cut too."""
    from benchmarks import common, width_cut

    model = common.classifier_from_config(common.tiny_bert_config(num_hidden_layers=3, num_attention_heads=4)).eval()
    batches = common.train_batches(common.synthetic_encoded(32), steps=2, batch_size=16, seed=0)
    keep = width_cut.choose(model, width_cut.Stats(model).collect(model, batches), 32, 48, 3)
    same, _ = width_cut.cut_model(model, keep, 32, 48)
    inputs = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, same.eval()(**inputs).logits)
    keep = width_cut.choose(model, width_cut.Stats(model).collect(model, batches), 24, 16, 2)
    assert len(keep["blocks"]) == 2 and all(len(q) == 24 for q in keep["qk"])
    slim, _ = width_cut.cut_model(model, keep, 24, 16)
    assert slim.config.hidden_size == 24 and slim.bert.encoder.layer[0].attention.self.attention_head_size == 6
    with pytest.raises(SystemExit, match="hidden 30 is not a multiple of the 4 heads.*layers 5 is not in 1..3"):
        width_cut.check_shape(model.config, 30, 16, 5)
    row = width_cut.main(["--smoke", "--out", str(tmp_path / "w.json")])["rows"][0]
    assert row["shape"] == {"hidden_size": 24, "intermediate_size": 16, "num_hidden_layers": 3}
    assert row["params"] < row["params_before"] and row["cut_at_step"] == 2


def test_masked_copies_mask_only_real_tokens_of_the_chosen_rows(tmp_path):
    from benchmarks import common, speed_plan_accuracy

    batches = common.train_batches(common.synthetic_encoded(64), steps=4, batch_size=16, seed=0)
    for b in batches:  # BERT's [CLS] ... [SEP] framing, so the special ids are there to be spared
        b["input_ids"][:, 0] = 101
    masked = common.masked_copies(batches, 0.5, mask_id=7, share=0.5, seed=0)
    changed_rows = 0
    for old, new in zip(batches, masked):
        hit = old["input_ids"] != new["input_ids"]
        assert bool((new["input_ids"][hit] == 7).all()) and not bool(hit[:, 0].any())  # [CLS] never masked
        assert not bool((hit & (old["attention_mask"] == 0)).any())  # nor padding
        assert torch.equal(old["labels"], new["labels"])
        changed_rows += int(hit.any(dim=1).sum())
    assert 16 < changed_rows < 48  # about half of the 64 rows
    out = str(tmp_path / "a.json")
    row = speed_plan_accuracy.main(["--smoke", "--only", "ffn75", "--augment", "0.2", "--out", out])
    assert row["rows"][0]["variant"] == "ffn75/aug0.2" and row["rows"][0]["augment"] == 0.2


def test_speed_plan_frontier_shares_of_the_same_seeds_dense(tmp_path):
    """``--frontier``: each plan row as a share of its own seed's dense row, the speed-up of its shape from the
    latency results; rows of another step count and later duplicates are left out; a PNG beside the table."""
    import json

    from benchmarks import speed_plan_accuracy

    def row(variant, seed, acc, units, steps=1600):
        return {"variant": variant, "seed": seed, "test_accuracy": acc, "units": units, "steps": steps}

    plan = [["ffn_neurons", 0.875], ["blocks", 2 / 6]]
    (tmp_path / "a.json").write_text(json.dumps({"rows": [
        {k: v for k, v in row("dense", 0, 0.80, []).items() if k != "seed"},  # an old row: no seed recorded
        row("dense/s1", 1, 0.90, []), row("p", 0, 0.78, plan), row("p/s1", 1, 0.90, plan),
        row("p/s2", 2, 0.5, plan),  # no dense row of seed 2: left out
        row("p/s3", 3, 0.1, plan, steps=150), row("dense/s3", 3, 0.2, [], steps=150)]}))
    (tmp_path / "b.json").write_text(json.dumps({"rows": [row("p", 0, 0.10, plan)]}))  # a later duplicate
    # another learning rate, recorded only in the file (rows written before it was recorded per row)
    (tmp_path / "c.json").write_text(json.dumps({"lr": 1e-4, "rows": [row("dense/s1", 1, 0.80, []),
                                                                      row("p/s1", 1, 0.76, plan)]}))
    (tmp_path / "lat.json").write_text(json.dumps({"rows": [{"variant": "ffn87.5+blocks2", "b32_speedup": 3.0},
                                                            {"variant": "ffn75", "b32_speedup": 9.0}]}))
    (tmp_path / "lat2.json").write_text(json.dumps({"rows": [{"variant": "ffn87.5+blocks2", "b32_speedup": 3.4}]}))
    out = tmp_path / "f.json"
    data = speed_plan_accuracy.main(["--frontier", *(str(tmp_path / f) for f in ("a.json", "b.json", "c.json")),
                                     "--steps", "1600",
                                     "--latency", str(tmp_path / "lat.json"), str(tmp_path / "lat2.json"),
                                     "--out", str(out)])
    assert set(data["plans"]) == {"p", "p/lr0.0001"}
    assert data["plans"]["p/lr0.0001"]["seeds"] == {1: pytest.approx(0.95)}  # against dense at the same rate
    entry = data["plans"]["p"]
    assert entry["shape"] == "ffn87.5+blocks2"
    assert entry["seeds"] == {0: pytest.approx(0.975), 1: pytest.approx(1.0)}
    assert entry["speedup"] == pytest.approx(3.2) and entry["mean"] == pytest.approx(0.9875)
    assert entry["se"] == pytest.approx(0.0125)
    assert out.is_file() and out.with_suffix(".png").is_file()
    only = speed_plan_accuracy.main(["--frontier", str(tmp_path / "a.json"), str(tmp_path / "c.json"), "--steps", "1600",
                                     "--include", "lr0\\.0001$", "--out", str(tmp_path / "g.json")])
    assert list(only["plans"]) == ["p/lr0.0001"] and only["plans"]["p/lr0.0001"]["speedup"] is None
    # a run at another rate names its rows so (before the seed), as the merge names old rows
    from argparse import Namespace

    from benchmarks import structured_accuracy

    assert structured_accuracy.label("ffn75+blocks2", Namespace(lr=1e-4, seed=2)) == "ffn75+blocks2/lr0.0001/s2"
    assert structured_accuracy.label("ffn75+blocks2", Namespace(lr=5e-5, seed=2)) == "ffn75+blocks2/s2"
