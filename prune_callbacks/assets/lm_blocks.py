"""Turn a text dataset into fixed-length causal-LM blocks (the ``run_clm`` recipe)."""

from __future__ import annotations

import warnings

__all__ = ["tokenize_and_group"]


def tokenize_and_group(
    dataset,
    tokenizer,
    block_size: int = 256,
    text_column: str = "text",
    add_eos: bool = True,
    batch_size: int = 1000,
):
    """Tokenize ``dataset[text_column]``, concatenate and cut into ``block_size`` blocks.

    Works on a ``datasets.Dataset`` or ``DatasetDict``.  Every document is
    tokenized without special tokens and, when ``add_eos`` and the tokenizer has
    an EOS token, followed by it (the document separator).  Documents of one
    ``map`` batch (``batch_size`` rows) are concatenated and the tail that does
    not fill a whole block is dropped.  All input columns are removed; output
    columns are ``input_ids``, ``attention_mask`` (all ones) and ``labels``
    (a copy of ``input_ids``; the model shifts them).  Every row has exactly
    ``block_size`` tokens, so ``transformers.default_data_collator`` suffices
    (``DataCollatorForLanguageModeling`` would mask EOS in the labels when
    pad == eos, as for SmolLM2).
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and block_size > limit:
        warnings.warn(
            f"block_size={block_size} exceeds tokenizer.model_max_length={limit}; "
            "the model may not accept sequences that long",
            stacklevel=2,
        )
    eos = getattr(tokenizer, "eos_token_id", None) if add_eos else None

    def _blocks(batch):
        encoded = tokenizer(batch[text_column], add_special_tokens=False, verbose=False)["input_ids"]
        stream: list[int] = []
        for ids in encoded:
            stream.extend(ids)
            if eos is not None:
                stream.append(eos)
        usable = len(stream) - len(stream) % block_size
        ids = [stream[i:i + block_size] for i in range(0, usable, block_size)]
        return {
            "input_ids": ids,
            "attention_mask": [[1] * block_size for _ in ids],
            "labels": [list(block) for block in ids],
        }

    if isinstance(dataset.column_names, dict):  # DatasetDict: map every split on its own columns
        import datasets

        return datasets.DatasetDict({
            name: tokenize_and_group(split, tokenizer, block_size, text_column, add_eos, batch_size)
            for name, split in dataset.items()
        })
    columns = dataset.column_names
    if text_column not in columns:
        raise KeyError(f"column {text_column!r} not in dataset columns {columns}")
    return dataset.map(_blocks, batched=True, batch_size=batch_size, remove_columns=columns,
                       desc=f"Grouping texts in blocks of {block_size}")
