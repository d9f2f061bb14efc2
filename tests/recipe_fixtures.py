"""A tiny local classification setup for recipe / CLI tests: a 2-layer BERT saved with a word-level
tokenizer, a CSV per split, and a recipe dict that trains it for a few steps in about a second."""

from __future__ import annotations

import csv
from pathlib import Path

import yaml

from helpers import tiny_bert_classifier

WORDS = "good bad great awful fine poor nice dull fun boring film movie plot actor scene story".split()
POSITIVE = {"good", "great", "fine", "nice", "fun"}


def tiny_model_dir(path: Path) -> Path:
    """A save_pretrained directory (config, weights, tokenizer) of a tiny BERT classifier."""
    if (path / "config.json").is_file():
        return path
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]", model_max_length=64)
    model = tiny_bert_classifier(seed=0, vocab_size=len(vocab), pad_token_id=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_csvs(folder: Path, rows: int = 24) -> dict[str, str]:
    """train.csv / validation.csv with columns text, label."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, n, offset in (("train", rows, 0), ("validation", max(4, rows // 3), 7)):
        path = folder / f"{split}.csv"
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text", "label"])
            for i in range(n):
                words = [WORDS[(i * 5 + j * 3 + offset) % len(WORDS)] for j in range(6)]
                writer.writerow([" ".join(words), int(bool(POSITIVE & set(words)))])
        files[split] = str(path)
    return files


def tiny_recipe(tmp_path: Path, out: Path, **sections) -> dict:
    """A recipe dict for the tiny setup; ``sections`` replace or extend the named sections."""
    root = tmp_path / "tiny-assets"
    recipe = {
        "task": "sequence-classification",
        "model": {"source": "local", "name": str(tiny_model_dir(root / "model"))},
        "data": {"source": "local", "files": tiny_csvs(root / "data"), "max_length": 16},
        "training": {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1,
                     "save_strategy": "steps", "save_steps": 2, "seed": 0, "use_cpu": True,
                     "dataloader_num_workers": 0, "disable_tqdm": True},
        "pruning": {"final_sparsity": 0.5, "start_step": 1, "end_step": 3, "update_every": 1, "saliency": "magnitude"},
        "evaluation": {"dense": False, "during_training": 0},
        "output": {"dir": str(out), "plot": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path
