"""`PruningConfigError` and how pydantic's ``ValidationError`` becomes it: one readable line per field.

Configs built on `_Validated` (`~prune_callbacks.core.config.PruningConfig`, `~prune_callbacks.core.config.L1Config`)
raise `PruningConfigError` on construction and on assignment; `format_validation_error` /
`validation_problems` turn a ``ValidationError`` (also a recipe's or a distillation config's) into
``path: message (got value)`` lines, naming the allowed keys for an unknown one.

`FiniteFloat` is the one float type of every config model (pruning, L1, guard, distillation,
recipe): NaN and +-inf are refused, naming the field and the value, before any range check.
`BLOCKS_WITHOUT_SLIM` is the one statement of the "blocks need slimming to be saved" rule (used by
`Pruner.finalize` and by the recipe's validation).
"""

from __future__ import annotations

import re
import math
from typing import Annotated, Any, Optional

from pydantic import BaseModel, Field, ValidationError


def check_finite(field: str, value: Any) -> Any:
    """Raise ``ValueError`` naming ``field`` and ``value`` when a float is NaN or +-inf (ints pass)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{field}={value!r} is invalid: must be a finite number")
    return value


#: a float field that refuses NaN and +-inf (``max_drop: .nan``, ``l1_lambda: .inf``) before any range check;
#: `format_validation_error` words the error as `check_finite` does (field, value, "must be a finite number")
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]

#: blocks removed by masks are skipped by a forward hook while training; a saved, unslimmed model has no hook
BLOCKS_WITHOUT_SLIM = (
    "granularity='blocks' removes blocks by skipping them with a forward hook while training, but a saved model "
    "keeps no hook: its zeroed blocks still run (a zeroed post-LayerNorm block such as BERT's is not an identity), "
    "so the saved model would not compute what was measured. Slim the model before saving "
    "(prune_callbacks.export.slim_pruned(model, pruner); make_callbacks(..., slim=True); "
    "hook.finalize(slim=True); recipe output.slim: true)"
)


class PruningConfigError(ValueError):
    """A pruning config that cannot work; the message names every offending field.

    ``problems`` holds the same as data: a list of ``(field path, message)``.
    """

    def __init__(self, message: str, problems: Optional[list[tuple[str, str]]] = None):
        super().__init__(message)
        self.problems = list(problems or [])


def _config_error(model_name: str, exc: ValidationError) -> PruningConfigError:
    return PruningConfigError(f"invalid {model_name}:\n" + format_validation_error(exc), validation_problems(exc))


class _RaisesConfigError(type(BaseModel)):
    """``PruningConfig(...)`` raises `PruningConfigError`, not pydantic's ``ValidationError``.

    Done in the metaclass's ``__call__`` (direct construction only): a config nested in a recipe
    is still validated by pydantic itself, so the recipe's errors keep their field paths.
    """

    def __call__(cls, *args: Any, **kwargs: Any):
        try:
            return super().__call__(*args, **kwargs)
        except ValidationError as exc:
            raise _config_error(cls.__name__, exc) from None


class _Validated(BaseModel, metaclass=_RaisesConfigError):
    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise _config_error(type(self).__name__, exc) from None


#: models whose unknown-key errors list the allowed keys, by the name pydantic gives as the error's title
_KEYED_MODELS: dict[str, type[BaseModel]] = {}


def list_allowed_keys(*models: type[BaseModel]) -> None:
    """Name the allowed keys in the unknown-key errors of these models (`format_validation_error`)."""
    _KEYED_MODELS.update({model.__name__: model for model in models})


def _allowed_keys(model_name: str) -> list[str]:
    model = _KEYED_MODELS.get(model_name)
    return sorted(model.model_fields) if model else []


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One line per offending field: ``path: message (got value)``."""
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = f"unknown key {path.rsplit('.', 1)[-1]!r}"
            allowed = _allowed_keys(exc.title)
            if allowed:
                message += f"; allowed keys: {', '.join(allowed)}"
        elif err["type"] == "finite_number":
            message = f"{path.rsplit('.', 1)[-1]}={err.get('input')!r} is invalid: must be a finite number"
        elif err["type"] == "literal_error":
            message = f"{message} (got {err.get('input')!r})"
        elif err["type"] in ("int_type", "float_type", "bool_type", "string_type", "list_type", "float_parsing"):
            message = f"{message} (got {err.get('input')!r})"
        if not err["loc"]:  # a whole-config check: each part names its field first ("field=value ...")
            for part in message.split("\n"):
                field = re.match(r"(\w+)=", part)
                lines.append(f"{'.'.join(p for p in (prefix, field.group(1) if field else '') if p) or '<root>'}: {part}")
            continue
        lines.append(f"{path or '<root>'}: {message}")
    return "\n".join(lines)


def validation_problems(exc: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    """The same lines as `format_validation_error`, as ``(field path, message)`` pairs."""
    return [tuple(line.split(": ", 1)) for line in format_validation_error(exc, prefix).splitlines()]  # type: ignore[misc]
