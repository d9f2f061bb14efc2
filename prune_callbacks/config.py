"""`PruningConfig`: the validated description of one pruning run.

The same object is taken by the core `Pruner`, the Trainer callbacks, the
Accelerate hook and the ``pruning:`` section of a recipe. Unknown keys are
rejected and every error names the field, the bad value and what is allowed.

Steps (``start_step``, ``end_step``, ``l1_ramp_steps``) are *optimizer* steps.
An ``int`` is an absolute step; a ``float`` in ``[0, 1]`` is a fraction of the
run, resolved once the total number of optimizer steps is known
(:meth:`PruningConfig.resolve`).
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator

Step = Union[StrictInt, float]

SALIENCY_METHODS = ("taylor", "platon", "magnitude", "movement")
SCHEDULES = ("cubic", "linear", "oneshot")
SCOPES = ("global", "per_layer")


class PruningConfigError(ValueError):
    """A pruning config that cannot work; the message names every offending field."""


class PruningConfig(BaseModel):
    """What to prune, how to score weights, and how fast to raise sparsity.

    Defaults were chosen from ``benchmarks/quality.py`` (BENCHMARKS.md, MiniLM on Rotten
    Tomatoes at 90%): taylor saliency with one global threshold kept 74.9% test accuracy against
    61.8% for per-layer magnitude; ``update_every`` 25 matched 10 (75.1 vs 74.9) at 2.5x fewer
    mask updates; ``beta`` 0.95, an earlier ``end_step`` (0.5), a 0.98 per-layer cap and L1 did
    not help (74.7, 73.7, 74.6, 75.0: all within noise), so the simpler settings stay.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    final_sparsity: float = Field(0.9, description="Fraction of targeted weights that are zero at the end, in [0, 1).")
    initial_sparsity: float = Field(0.0, description="Sparsity applied at start_step, in [0, final_sparsity].")
    start_step: Step = Field(0.1, description="First optimizer step of the schedule (int) or fraction of the run (float).")
    end_step: Step = Field(0.7, description="Step at which final_sparsity is reached (int) or fraction of the run (float).")
    update_every: StrictInt = Field(25, description="Masks are recomputed every this many optimizer steps.")
    schedule: Literal["cubic", "linear", "oneshot"] = "cubic"

    saliency: Literal["taylor", "platon", "magnitude", "movement"] = "taylor"
    beta: float = Field(0.85, description="EMA factor of the taylor score and of platon's importance.")
    uncertainty_beta: float = Field(0.95, description="EMA factor of platon's uncertainty term.")

    scope: Literal["global", "per_layer"] = "global"
    min_layer_sparsity: float = Field(0.0, description="global scope: no target is pruned below this (capped by the current target).")
    max_layer_sparsity: float = Field(1.0, description="global scope: no target is pruned above this.")

    include: Optional[list[str]] = Field(
        None, description="Regexes (re.search) over module names; None = every Linear inside the repeated blocks."
    )
    exclude: list[str] = Field(default_factory=list, description="Regexes over module names removed from the targets.")

    l1_lambda: float = Field(0.0, description="Strength of the proximal L1 step on targeted weights (0 = off).")
    l1_ramp_steps: Step = Field(0, description="L1 strength grows linearly from 0 over this many steps (or fraction).")

    sync_masks: bool = Field(True, description="Under torch.distributed, broadcast masks from rank 0 at every update.")

    # ------------------------------------------------------------------ fields
    @field_validator("final_sparsity")
    @classmethod
    def _final_in_range(cls, v: float) -> float:
        if not (0.0 <= v < 1.0) or math.isnan(v):
            raise ValueError(f"final_sparsity={v!r} is invalid: must be in [0, 1) (1.0 would remove every weight)")
        return v

    @field_validator("initial_sparsity", "min_layer_sparsity", "max_layer_sparsity")
    @classmethod
    def _fraction(cls, v: float, info) -> float:
        if not (0.0 <= v <= 1.0):
            raise ValueError(f"{info.field_name}={v!r} is invalid: must be in [0, 1]")
        return v

    @field_validator("beta", "uncertainty_beta")
    @classmethod
    def _beta(cls, v: float, info) -> float:
        if not (0.0 <= v < 1.0):
            raise ValueError(f"{info.field_name}={v!r} is invalid: an EMA factor must be in [0, 1)")
        return v

    @field_validator("update_every")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"update_every={v!r} is invalid: must be an integer >= 1")
        return v

    @field_validator("l1_lambda")
    @classmethod
    def _non_negative(cls, v: float) -> float:
        if v < 0 or math.isnan(v):
            raise ValueError(f"l1_lambda={v!r} is invalid: must be >= 0")
        return v

    @field_validator("start_step", "end_step", "l1_ramp_steps")
    @classmethod
    def _step(cls, v: Step, info) -> Step:
        if isinstance(v, bool):
            raise ValueError(f"{info.field_name}={v!r} is invalid: give an int step or a float fraction in [0, 1]")
        if isinstance(v, int):
            if v < 0:
                raise ValueError(f"{info.field_name}={v!r} is invalid: an absolute step must be >= 0")
        elif not (0.0 <= v <= 1.0):
            raise ValueError(
                f"{info.field_name}={v!r} is invalid: a float is a fraction of the run and must be in [0, 1]; "
                f"use an int (e.g. {int(v)}) for an absolute optimizer step"
            )
        return v

    @field_validator("include", "exclude")
    @classmethod
    def _patterns_compile(cls, v, info):
        import re

        for pattern in v or []:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{info.field_name} pattern {pattern!r} is not a valid regex: {exc}") from None
        if v is not None and info.field_name == "include" and len(v) == 0:
            raise ValueError("include=[] selects nothing: omit it (null) for the default targets or list patterns")
        return v

    # ------------------------------------------------------------- whole model
    @model_validator(mode="after")
    def _consistent(self) -> "PruningConfig":
        problems = []
        if self.initial_sparsity > self.final_sparsity:
            problems.append(
                f"initial_sparsity={self.initial_sparsity} is above final_sparsity={self.final_sparsity}: "
                "sparsity never decreases (allowed: initial_sparsity <= final_sparsity)"
            )
        if self.min_layer_sparsity > self.final_sparsity:
            problems.append(
                f"min_layer_sparsity={self.min_layer_sparsity} is above final_sparsity={self.final_sparsity}: "
                "every target cannot be sparser than the total (allowed: min_layer_sparsity <= final_sparsity)"
            )
        if self.max_layer_sparsity < self.final_sparsity:
            problems.append(
                f"max_layer_sparsity={self.max_layer_sparsity} is below final_sparsity={self.final_sparsity}: "
                "the total cannot be reached (allowed: max_layer_sparsity >= final_sparsity)"
            )
        if type(self.start_step) is type(self.end_step) and self.schedule != "oneshot" and self.end_step < self.start_step:
            problems.append(
                f"end_step={self.end_step} is before start_step={self.start_step} (allowed: end_step >= start_step)"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # --------------------------------------------------------------- helpers
    def uses_fractions(self) -> bool:
        return any(isinstance(v, float) for v in (self.start_step, self.end_step, self.l1_ramp_steps))

    def resolve(self, total_steps: Optional[int]) -> "ResolvedSchedule":
        """Turn fractional steps into absolute optimizer steps for a run of ``total_steps``."""
        if total_steps is None and self.uses_fractions():
            fractional = [n for n in ("start_step", "end_step", "l1_ramp_steps") if isinstance(getattr(self, n), float)]
            raise PruningConfigError(
                f"{', '.join(f'{n}={getattr(self, n)!r}' for n in fractional)} "
                "are fractions of the run, but the total number of optimizer steps is unknown: "
                "pass total_steps=... or give absolute int steps"
            )

        def absolute(value: Step) -> int:
            return int(round(value * total_steps)) if isinstance(value, float) else int(value)

        start, end = absolute(self.start_step), absolute(self.end_step)
        problems = []
        if self.schedule != "oneshot" and end < start:
            problems.append(f"end_step resolves to {end}, before start_step {start}")
        if total_steps is not None:
            if end > total_steps and self.schedule != "oneshot":
                problems.append(
                    f"end_step={self.end_step!r} resolves to step {end}, beyond the run's {total_steps} optimizer "
                    f"steps: final_sparsity={self.final_sparsity} would never be reached (use end_step <= {total_steps} "
                    "or a fraction such as 0.7)"
                )
            if start > total_steps:
                problems.append(f"start_step={self.start_step!r} resolves to step {start}, beyond the run's {total_steps} steps")
        if problems:
            raise PruningConfigError("; ".join(problems))
        return ResolvedSchedule(start_step=start, end_step=end, l1_ramp_steps=absolute(self.l1_ramp_steps))


class ResolvedSchedule(BaseModel):
    """Absolute optimizer steps of one run."""

    model_config = ConfigDict(frozen=True)
    start_step: int
    end_step: int
    l1_ramp_steps: int


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
        elif err["type"] == "literal_error":
            message = f"{message} (got {err.get('input')!r})"
        elif err["type"] in ("int_type", "float_type", "bool_type", "string_type", "list_type", "float_parsing"):
            message = f"{message} (got {err.get('input')!r})"
        lines.append(f"{path or '<root>'}: {message}")
    return "\n".join(lines)


def _allowed_keys(model_name: str) -> list[str]:
    model = {"PruningConfig": PruningConfig}.get(model_name)
    return sorted(model.model_fields) if model else []


def make_config(config: "PruningConfig | dict | None" = None, **overrides) -> PruningConfig:
    """Build a config from a dict / config / keywords, raising `PruningConfigError` with readable lines."""
    if isinstance(config, PruningConfig):
        data = config.model_dump()
    else:
        data = dict(config or {})
    data.update(overrides)
    try:
        return PruningConfig(**data)
    except ValidationError as exc:
        raise PruningConfigError("invalid pruning config:\n" + format_validation_error(exc)) from None
