"""Recipe ``output.slim: true``: validation, and finetune runs whose saved model is a smaller ordinary model
that plain ``from_pretrained`` reloads with the masked model's outputs (tiny BERT / Llama, CLI path)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from recipe_fixtures import tiny_recipe, write_recipe  # noqa: E402
from test_cli_finetune import WORDS  # noqa: E402

from prune_callbacks.cli import main  # noqa: E402
from prune_callbacks.recipe import RecipeError, load_recipe  # noqa: E402

STEPS = {"start_step": 1, "end_step": 3, "update_every": 1, "saliency": "taylor"}
FFN = {"granularity": "ffn_neurons", "final_sparsity": 0.5, **STEPS}
BLOCKS = {"granularity": "blocks", "final_sparsity": 0.5, **STEPS}
UNSTRUCTURED = {"final_sparsity": 0.5, **STEPS}


def _recipe(tmp_path, name, pruning, **output):
    out = tmp_path / name
    return write_recipe(tmp_path / f"{name}.yaml", tiny_recipe(tmp_path, out, pruning=pruning,
                                                               output={"dir": str(out), "plot": False, **output})), out


@pytest.mark.parametrize("pruning, output, path, words", [
    (UNSTRUCTURED, {"slim": True}, "output.slim",
     ["needs structured pruning", "'unstructured'", "pruning.granularity", "ffn_neurons, attention_heads, blocks",
      "output.slim: false"]),
    ([UNSTRUCTURED, {**UNSTRUCTURED, "granularity": "2:4", "final_sparsity": 0.5, "include": ["attention"]}],
     {"slim": True}, "output.slim", ["'unstructured', '2:4'", "one pruning entry"]),
    (FFN, {"slim": True, "save_sparse": True}, "output.save_sparse",
     ["does not apply with output.slim: true", "leave save_sparse out, or false"]),
])
def test_slim_refused_where_it_cannot_apply(tmp_path, pruning, output, path, words):
    recipe, _ = _recipe(tmp_path, "r", pruning, **output)
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    text = str(info.value)
    assert path in text
    for word in words:
        assert word in text, text


@pytest.mark.parametrize("pruning", [FFN, [{**UNSTRUCTURED, "include": ["attention"]}, FFN]])
def test_slim_accepted_with_a_structured_config(tmp_path, pruning):
    recipe, _ = _recipe(tmp_path, "r", pruning, slim=True)
    loaded = load_recipe(recipe)
    assert loaded.output.slim and loaded.output.save_sparse  # the default; skipped at save time


def test_slim_with_a_partial_scope_is_refused_before_training(tmp_path, capsys):
    recipe, out = _recipe(tmp_path, "r", {**FFN, "include": [r"layer\.0\."]}, slim=True)
    assert main(["finetune", str(recipe)]) != 0
    err = capsys.readouterr().err
    assert "output.slim" in err and "leaves blocks [1] out of its scope" in err
    assert not out.exists()  # nothing trained, nothing written


def _logits(model_dir, auto, ids):
    model = auto.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        return model, model(input_ids=ids).logits


def test_bert_slim_run_saves_a_smaller_model_equal_to_the_masked_one(tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    masked_recipe, masked_out = _recipe(tmp_path, "masked", FFN, save_sparse=False)
    slim_recipe, slim_out = _recipe(tmp_path, "slim", FFN, slim=True)
    assert main(["finetune", str(masked_recipe)]) == 0
    assert main(["finetune", str(slim_recipe)]) == 0
    printed = capsys.readouterr().out
    assert "slim         " in printed and "intermediate_size 37 -> 19" in printed

    ids = AutoTokenizer.from_pretrained(str(slim_out))(["good film bad plot", "fun story"], padding=True,
                                                       return_tensors="pt")["input_ids"]
    masked, expected = _logits(masked_out, AutoModelForSequenceClassification, ids)
    slim, got = _logits(slim_out, AutoModelForSequenceClassification, ids)
    assert (got - expected).abs().max().item() <= 1e-5
    assert slim.config.intermediate_size == 19 and masked.config.intermediate_size == 37
    assert all(layer.intermediate.dense.out_features == 19 for layer in slim.bert.encoder.layer)
    assert sum(p.numel() for p in slim.parameters()) == sum(p.numel() for p in masked.parameters()) - 2 * 18 * (2 * 32 + 1)

    report = json.loads((slim_out / "report.json").read_text())
    masked_report = json.loads((masked_out / "report.json").read_text())
    # the sparsity figures describe the pruned (masked) model, as in the run without slim
    assert report["sparsity"] == masked_report["sparsity"] and report["per_target"] == masked_report["per_target"]
    assert report["sparsity"]["target_sparsity"] > 0.3
    assert report["slim"]["config"] == {"intermediate_size": [37, 19]}
    assert report["slim"]["saved_params"] == report["slim"]["params_after"] == sum(p.numel() for p in slim.parameters())
    assert report["sizes"]["sparse_dir"] is None and "nothing to compress" in report["sizes"]["sparse_skipped"]
    assert not (slim_out / "sparse").exists()
    assert (slim_out / "tokenizer.json").is_file()
    for key in ("loss", "accuracy"):
        assert report["pruned_metrics"][key] == masked_report["pruned_metrics"][key]
    markdown = (slim_out / "REPORT.md").read_text()
    assert "| slimmed (units cut out" in markdown and "# a smaller ordinary model" in markdown


def _tiny_gqa_dir(path):
    """A 3-block Llama with 2 KV groups of 2 query heads, saved with a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from helpers import tiny_llama_lm

    vocab = {"[UNK]": 0, "[PAD]": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(WORDS))}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>")
    model = tiny_llama_lm(seed=0, vocab_size=len(vocab) + 3, pad_token_id=1, eos_token_id=2, bos_token_id=2,
                          num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_llama_slim_run_cuts_kv_groups_neurons_and_a_block_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir = _tiny_gqa_dir(tmp_path / "tiny-lm")
    text = tmp_path / "text.jsonl"
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (40,), generator=g)) for _ in range(30)]
    text.write_text("\n".join(json.dumps({"text": line}) for line in lines))
    heads = {"granularity": "attention_heads", "final_sparsity": 0.5, **STEPS}
    blocks = {**BLOCKS, "final_sparsity": 1 / 3}
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "lm.yaml", {
        "task": "causal-lm",
        "model": {"source": "local", "name": str(model_dir)},
        "data": {"source": "local", "files": {"train": str(text)}, "eval_fraction": 0.2, "max_length": 16},
        "training": {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": "1e-3", "logging_steps": 1,
                     "use_cpu": True, "seed": 0},
        "pruning": [FFN, heads, blocks],
        "evaluation": {"during_training": 0, "dense": False},
        "output": {"dir": str(out), "slim": True, "plot": False},
    })
    assert main(["finetune", str(recipe)]) == 0
    report = json.loads((out / "report.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert (config["intermediate_size"], config["num_attention_heads"], config["num_key_value_heads"],
            config["num_hidden_layers"], config["head_dim"]) == (24, 2, 1, 2, 8)
    assert len(config.get("layer_types") or [0, 0]) == 2  # per-layer lists, where the config has them
    assert report["slim"]["kept"]["ffn_neurons"] == 24 and report["slim"]["kept"]["attention_heads"] == 1
    assert len(report["slim"]["kept"]["blocks"]) == 2
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.randint(3, 16, (2, 10), generator=g)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
        generated = model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)  # KV cache with renumbered layers
    assert torch.isfinite(loss) and generated.shape == (1, 7)
    assert sum(p.numel() for p in model.parameters()) == report["slim"]["params_after"]
    assert report["pruned_metrics"]["perplexity"] > 0


def test_epoch_based_recipe_with_fractional_steps_passes_the_model_checks(tmp_path):
    """validate --load / finetune dry-build the Pruner before the Trainer knows its step count (shipped
    minilm-rt-90 / minilm-rt-slim: num_train_epochs with start_step 0.1); that must not refuse the recipe."""
    recipe = tiny_recipe(tmp_path, tmp_path / "out", pruning={**FFN, "start_step": 0.1, "end_step": 0.6},
                         output={"dir": str(tmp_path / "out"), "slim": True, "plot": False})
    recipe["training"] = {k: v for k, v in recipe["training"].items() if k != "max_steps"} | {"num_train_epochs": 1}
    path = write_recipe(tmp_path / "epochs.yaml", recipe)
    assert main(["validate", str(path), "--load"]) == 0
    assert main(["finetune", str(path)]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["intermediate_size"] == 19
