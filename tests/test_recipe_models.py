"""The model section made real: local directories, hub names offline, padding, label names."""

from __future__ import annotations

import pytest

from helpers import tiny_bert_classifier, tiny_llama_lm
from prune_callbacks.recipe import RecipeError, validate_data
from prune_callbacks.recipe.models import load_model, max_positions


def _save_with_tokenizer(model, path, pad: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1, "[PAD]": 2, "a": 3, "b": 4}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"pad_token": "[PAD]"} if pad else {}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="</s>", **extra)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _recipe(task: str, source: str, name: str):
    data = {"name": "rotten_tomatoes"} if task == "sequence-classification" else {"name": "kjv"}
    return validate_data({"task": task, "model": {"source": source, "name": name}, "data": data})


def test_local_classifier_gets_the_recipe_labels(tmp_path):
    path = _save_with_tokenizer(tiny_bert_classifier(seed=0, num_labels=2), tmp_path / "bert")
    model, tokenizer = load_model(_recipe("sequence-classification", "local", str(path)), ["neg", "neutral", "pos"])
    assert model.config.num_labels == 3 and model.config.id2label == {0: "neg", 1: "neutral", 2: "pos"}
    assert type(model).__name__ == "BertForSequenceClassification" and tokenizer.pad_token == "[PAD]"
    assert max_positions(model, tokenizer) == 64  # the tiny config's max_position_embeddings


def test_local_causal_lm_without_pad_token_pads_with_eos(tmp_path):
    path = _save_with_tokenizer(tiny_llama_lm(seed=0, pad_token_id=None), tmp_path / "lm", pad=False)
    model, tokenizer = load_model(_recipe("causal-lm", "local", str(path)))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tokenizer.pad_token == "</s>" and model.config.pad_token_id == tokenizer.pad_token_id == 1


def test_hub_name_offline_fails_with_the_recipe_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = _recipe("sequence-classification", "hub", "no-such-owner/no-such-model-xyz")
    with pytest.raises(RecipeError, match=r"model\.name: could not load 'no-such-owner/no-such-model-xyz' \(hub\)"):
        load_model(recipe, ["a", "b"])
