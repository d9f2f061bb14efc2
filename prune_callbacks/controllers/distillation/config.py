"""`DistillationConfig`: knowledge distillation from a dense teacher while the student is pruned.

Validated like `PruningConfig`: unknown keys are rejected and every error names
the field, the bad value and what is allowed. The same object is taken by the
Trainer callback, the Accelerate hook and the ``distillation:`` section of a recipe.

Defaults (see BENCHMARKS.md, "Distillation"; MiniLM on Rotten Tomatoes at 90%, reduced setting):
``hardness`` 0.5: with the fully fine-tuned dense model as teacher, 1.0 gave 76.9 and 0.5 gave 75.5
(no distillation: 74.4), but with a ``"self"`` teacher copied before pruning in a short run (still at
the majority class) 1.0 collapsed the student to that class (57.8) while 0.5 kept 74.7, so 0.5 is
the default that cannot ruin a run; pass 1.0 with a trained dense teacher. ``teacher="self"``
snapshotted ``"before_pruning"`` (a newly initialised classification head is at chance level at train
begin, so a train-begin copy can only be worse). ``temperature`` 2.0 (oBERT's value, not varied).
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from prune_callbacks.core.config import PruningConfigError, format_validation_error
from prune_callbacks.core.config_errors import FiniteFloat

SNAPSHOTS = ("train_begin", "before_pruning")
TEACHER_DTYPES = ("bf16", "fp16")


class DistillationConfigError(PruningConfigError):
    """A distillation config (or teacher) that cannot work; the message names the offending field."""


class DistillationConfig(BaseModel):
    """Where the teacher comes from and how its outputs enter the student's loss.

    The loss the student trains on is
    ``hardness * KD + (1 - hardness) * task_loss + hidden_weight * hidden_loss`` with
    ``KD = T^2 * KL(softmax(teacher/T) || softmax(student/T))`` averaged over examples
    (classification) or over the tokens whose label is not -100 (causal / token-level LM), and
    ``hidden_loss`` the mean over blocks of ``sum((t - s)^2) / sum(t^2)`` on the hidden states.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, arbitrary_types_allowed=True)

    teacher: Any = Field(
        "self",
        description='"self" (a frozen copy of the model being trained, taken at `snapshot`), a path to a '
        "save_pretrained folder of the same architecture family, or an nn.Module.",
    )
    snapshot: Literal["train_begin", "before_pruning"] = Field(
        "before_pruning",
        description='When a "self" teacher is copied: "train_begin" (the model as loaded) or "before_pruning" '
        "(after the optimizer steps before the first mask update, so a new head is trained first).",
    )
    temperature: FiniteFloat = Field(2.0, description="Softmax temperature of the KL term (> 0); the term is scaled by T^2.")
    hardness: FiniteFloat = Field(0.5, description="Weight of the KD term against the task loss, in [0, 1] (1 = KD only; "
                            "use 1.0 with a fully fine-tuned dense teacher).")
    hidden_weight: FiniteFloat = Field(
        0.0, description="Weight of the per-block normalised hidden-state MSE (0 = off); needs equal depth and width."
    )
    teacher_dtype: Optional[Literal["bf16", "fp16"]] = Field(
        None, description="Keep the teacher in this dtype (halves its memory); None = the student's dtype."
    )

    @field_validator("teacher")
    @classmethod
    def _teacher(cls, v: Any) -> Any:
        if v == "self":
            return v
        if isinstance(v, os.PathLike):
            v = os.fspath(v)
        if isinstance(v, str):
            if not v:
                raise ValueError("teacher='' is invalid: give \"self\", a model folder or an nn.Module")
            if not os.path.isdir(v):
                raise ValueError(f"teacher={v!r} is invalid: no such folder (give \"self\", an existing "
                                 "save_pretrained folder or an nn.Module)")
            return v
        try:
            from torch import nn
        except ImportError:  # pragma: no cover - torch is a dependency
            nn = None
        if nn is not None and isinstance(v, nn.Module):
            return v
        raise ValueError(f"teacher={v!r} is invalid: give \"self\", a path to a model folder or an nn.Module "
                         f"(got {type(v).__name__})")

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        if not (v > 0) or math.isinf(v):
            raise ValueError(f"temperature={v!r} is invalid: must be a finite number > 0 (2.0 is usual)")
        return v

    @field_validator("hardness")
    @classmethod
    def _hardness(cls, v: float) -> float:
        if not (0.0 <= v <= 1.0):
            raise ValueError(f"hardness={v!r} is invalid: must be in [0, 1] (1 = distillation term only, "
                             "0 = task loss only)")
        return v

    @field_validator("hidden_weight")
    @classmethod
    def _hidden(cls, v: float) -> float:
        if not (v >= 0) or math.isinf(v):
            raise ValueError(f"hidden_weight={v!r} is invalid: must be a finite number >= 0 (0 = off)")
        return v

    @property
    def self_teacher(self) -> bool:
        return isinstance(self.teacher, str) and self.teacher == "self"

    def dump(self) -> dict:
        """JSON-able description (an nn.Module teacher is named by its class)."""
        data = self.model_dump(exclude={"teacher"})
        data["teacher"] = self.teacher if isinstance(self.teacher, str) else f"<{type(self.teacher).__name__}>"
        return data


def make_distillation_config(config: Union[DistillationConfig, dict, None] = None, **overrides) -> DistillationConfig:
    """Build a config from a config / dict / keywords, raising `DistillationConfigError` with readable lines."""
    if isinstance(config, DistillationConfig):
        data = {name: getattr(config, name) for name in DistillationConfig.model_fields}
    elif config is None or isinstance(config, dict):
        data = dict(config or {})
    else:
        raise DistillationConfigError(
            f"distillation={config!r} is invalid: give a DistillationConfig, a dict of its fields or None"
        )
    data.update(overrides)
    try:
        return DistillationConfig(**data)
    except ValidationError as exc:
        lines = format_validation_error(exc).splitlines()
        allowed = ", ".join(DistillationConfig.model_fields)
        lines = [f"{line}; allowed keys: {allowed}" if "unknown key" in line and "allowed keys" not in line else line
                 for line in lines]
        raise DistillationConfigError("invalid distillation config:\n" + "\n".join(lines)) from None
