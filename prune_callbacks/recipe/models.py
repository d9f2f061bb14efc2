"""The ``model:`` section made real: ``(model, tokenizer)`` for the recipe's task.

Built-in models come from the offline asset packages; a local directory or a
hub repo id goes through ``AutoModelFor...from_pretrained``.
"""

from __future__ import annotations

import contextlib
from typing import Optional

from prune_callbacks.recipe.errors import RecipeError
from prune_callbacks.recipe.schema import Recipe


def _torch_dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def _label_kwargs(label_names: Optional[list[str]]) -> dict:
    if not label_names:
        return {}
    return {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
            "label2id": {n: i for i, n in enumerate(label_names)}}


def load_model(recipe: Recipe, label_names: Optional[list[str]] = None):
    """Return ``(model, tokenizer)``; classification heads get ``len(label_names)`` outputs."""
    m = recipe.model
    dtype = _torch_dtype(m.dtype)
    labels = _label_kwargs(label_names) if recipe.task == "sequence-classification" else {}
    if m.source == "builtin":
        from prune_callbacks import assets

        if m.name == "minilm":
            num_labels = labels.pop("num_labels", 2)
            model, tokenizer = assets.load_minilm_for_classification(
                num_labels=num_labels, **labels, **({} if dtype == "auto" else {"dtype": dtype}))
        else:
            model, tokenizer = assets.load_smollm2(dtype=None if dtype == "auto" else dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        cls = AutoModelForCausalLM if recipe.task == "causal-lm" else AutoModelForSequenceClassification
        where = {"revision": m.revision} if m.source == "hub" else {"local_files_only": True}
        if recipe.task == "sequence-classification":
            labels["ignore_mismatched_sizes"] = True  # a head trained for other labels is re-initialized
        try:
            tokenizer = AutoTokenizer.from_pretrained(m.name, **where)
            model = cls.from_pretrained(m.name, dtype=dtype, **labels, **where)
        except (OSError, ValueError) as exc:
            raise RecipeError([("model.name", f"could not load {m.name!r} ({m.source}): {exc}")],
                              source="model") from None
    _ensure_padding(model, tokenizer)
    return model, tokenizer


def _ensure_padding(model, tokenizer) -> None:
    """Decoder tokenizers often lack a pad token: batching needs one (EOS is the usual choice)."""
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and getattr(tokenizer, "pad_token_id", None) is not None:
        model.config.pad_token_id = tokenizer.pad_token_id


def max_positions(model, tokenizer) -> Optional[int]:
    """Longest input the model accepts, when it says."""
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [x for x in limits if isinstance(x, int) and 0 < x < 10**7]
    return min(limits) if limits else None


@contextlib.contextmanager
def quiet_transformers():
    """Hide load-time chatter (e.g. the expected 'newly initialized classifier' report); progress bars stay."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)
