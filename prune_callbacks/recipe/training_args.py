"""The ``training:`` section: ``transformers.TrainingArguments`` keywords, checked lazily.

Key names are checked against ``dataclasses.fields(TrainingArguments)`` (with a
close-match suggestion), values against the field's type annotation (lax, so
YAML's ``2e-5``, which PyYAML reads as a string, becomes a float), and then the
whole set by building ``TrainingArguments`` once, which catches its own
cross-field rules (unknown scheduler or optimizer names, strategy mismatches).

Keys the workflow owns are refused rather than silently overridden.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import tempfile
import typing
from typing import Any

# key -> why the recipe refuses it
OWNED = {
    "output_dir": "the workflow writes checkpoints to <output.dir>/checkpoints; set output.dir (or --output-dir) instead",
    "do_train": "the finetune workflow always trains; remove it",
    "do_eval": "the finetune workflow always evaluates (see the evaluation section); remove it",
    "do_predict": "the finetune workflow does not predict; remove it",
    "resume_from_checkpoint": "the workflow resumes an interrupted run from its own newest checkpoint; use "
                              "--resume (output.resume: true or auto) instead",
}
# key -> (smallest allowed value, what it means); TrainingArguments accepts these and the run fails later
BOUNDS = {
    "per_device_train_batch_size": (1, "examples per device and step"),
    "per_device_eval_batch_size": (1, "examples per device and evaluation step"),
    "gradient_accumulation_steps": (1, "batches per optimizer step"),
    "num_train_epochs": (0, "epochs (> 0; used when max_steps is not set)"),
    "learning_rate": (0, "the peak learning rate (>= 0)"),
    "save_total_limit": (1, "checkpoints kept (omit it to keep all)"),
    "logging_steps": (0, "steps between log lines (> 0)"),
}
_JSONABLE = (str, int, float, bool, type(None), list, dict)


@functools.lru_cache(maxsize=1)
def _fields() -> tuple[dict[str, Any], dict[str, Any]]:
    from transformers import TrainingArguments

    fields = {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}
    try:
        hints = typing.get_type_hints(TrainingArguments)
    except Exception:  # an annotation transformers itself cannot resolve: skip type checks
        hints = {}
    return fields, hints


@functools.lru_cache(maxsize=None)
def _adapter(hint):
    from pydantic import TypeAdapter

    try:
        return TypeAdapter(hint)
    except Exception:  # arbitrary classes (e.g. accelerate configs): no type check
        return None


def training_keys() -> list[str]:
    return sorted(_fields()[0])


def check_training(training: Any, path: str = "training") -> tuple[dict, list[tuple[str, str]]]:
    """Return ``(coerced keywords, problems)``; problems are ``(yaml path, message)`` pairs."""
    if training is None:
        return {}, []
    if not isinstance(training, dict):
        return {}, [(path, f"must be a mapping of TrainingArguments keywords (got {training!r})")]
    fields, hints = _fields()
    coerced, problems = {}, []
    for key, value in training.items():
        where = f"{path}.{key}"
        if not isinstance(key, str):
            problems.append((where, f"keys must be strings (got {key!r})"))
        elif key in OWNED:
            problems.append((where, f"{key}={value!r} is set by the workflow: {OWNED[key]}"))
        elif key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append((where, f"unknown TrainingArguments key {key!r}{hint} "
                                    "(allowed: the fields of transformers.TrainingArguments)"))
        else:
            ok, new = _check_value(hints.get(key), value)
            if not ok:
                problems.append((where, f"{new} (got {value!r})"))
            else:
                coerced[key] = new
    problems.extend(_bounds(coerced, path))
    if training.get("load_best_model_at_end") is True:
        problems.append((f"{path}.load_best_model_at_end",
                         "load_best_model_at_end=True would replace the final pruned model by an earlier, less sparse "
                         "checkpoint; allowed: false"))
    if not problems:
        problems.extend(_construct(coerced, path))
    return coerced, problems


def _bounds(values: dict, path: str) -> list[tuple[str, str]]:
    """Numbers TrainingArguments accepts but the run cannot use (a batch size of 0 fails inside torch)."""
    problems = [(f"{path}.{key}", f"{key}={value!r} is invalid: must be a finite number")
                for key, value in values.items() if isinstance(value, float) and not math.isfinite(value)]
    for key, (low, what) in BOUNDS.items():
        value = values.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            continue
        strict = key in ("num_train_epochs", "logging_steps")
        if value < low or (strict and value <= low):
            allowed = f"> {low}" if strict else f">= {low}"
            problems.append((f"{path}.{key}", f"{key}={value!r} is invalid: {what}; allowed: {allowed}"))
    max_steps = values.get("max_steps")
    if isinstance(max_steps, int) and not isinstance(max_steps, bool) and (max_steps == 0 or max_steps < -1):
        problems.append((f"{path}.max_steps", f"max_steps={max_steps!r} is invalid; allowed: >= 1 "
                                              "(or -1 / omitted to train for num_train_epochs)"))
    return problems


def _check_value(hint, value) -> tuple[bool, Any]:
    if hint is None:
        return True, value
    adapter = _adapter(hint)
    if adapter is None:
        return True, value
    from pydantic import ValidationError

    try:
        new = adapter.validate_python(value)
    except ValidationError as exc:
        return False, f"expected {_type_name(hint)}: " + exc.errors()[0]["msg"]
    # keep the user's value unless coercion changed it into something YAML can write back ("2e-5" -> 2e-05)
    if new == value or not isinstance(new, _JSONABLE):
        return True, value
    return True, new


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _construct(kwargs: dict, path: str) -> list[tuple[str, str]]:
    """Build TrainingArguments once to run its own checks (no files are written)."""
    from transformers import TrainingArguments

    with tempfile.TemporaryDirectory() as tmp:
        try:
            TrainingArguments(output_dir=tmp, **kwargs)
        except (ValueError, TypeError) as exc:
            message = str(exc).strip()
            # point at the key whose value the message quotes, when exactly one does
            quoted = [k for k, v in kwargs.items() if isinstance(v, str) and v and message.startswith(v)]
            where = f"{path}.{quoted[0]}" if len(quoted) == 1 else path
            return [(where, f"TrainingArguments rejects these settings: {message}")]
    return []


def build_training_arguments(training: dict, output_dir: str, **defaults):
    """``TrainingArguments`` from the (checked) recipe keywords; ``defaults`` apply where the recipe is silent."""
    from transformers import TrainingArguments

    kwargs = {**defaults, **training}
    return TrainingArguments(output_dir=output_dir, **kwargs)
