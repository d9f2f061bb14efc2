"""`AccuracyGuardConfig`: the settings of the accuracy-guarded sparsity controller (``PruningConfig.accuracy_guard``)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from prune_callbacks.core.config_errors import FiniteFloat

#: metric names containing one of these are minimised when ``mode`` is left to None
_MINIMISED = ("loss", "perplexity", "ppl", "error", "wer", "cer")


class AccuracyGuardConfig(BaseModel):
    """Hold or roll back sparsity when the evaluation metric drops more than ``max_drop`` below the dense baseline.

    ``final_sparsity`` of the enclosing `PruningConfig` stays the upper bound; the guard only
    lowers the schedule's value. See :mod:`prune_callbacks.controllers.guard.controller` for the decisions.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    metric: str = Field("eval_accuracy", min_length=1,
                        description="Key of the evaluation metrics to guard (as Trainer.evaluate returns it).")
    max_drop: FiniteFloat = Field(0.01, description="Allowed drop from the dense baseline (>= 0), absolute or relative.")
    relative: bool = Field(False, description="max_drop is a fraction of the baseline instead of absolute units.")
    every: StrictInt = Field(50, ge=1, description="Evaluate every this many optimizer steps while pruning (>= 1).")
    patience: StrictInt = Field(2, ge=1, description="Consecutive failing evaluations at one sparsity before rolling back "
                                "(1: roll back at the first failure; 2: hold once for recovery, then roll back).")
    mode: Optional[Literal["max", "min"]] = Field(
        None, description="max: higher is better; min: lower is better; None: 'min' for loss/perplexity-like names.")
    baseline: Literal["before_pruning", "train_begin"] = Field(
        "before_pruning", description="When the dense baseline is measured: before_pruning (after the last optimizer "
        "step before the first mask update: the dense model fine-tuned as far as the run got; a fresh classifier "
        "head is no longer at chance) or train_begin (before any step; the same when pruning starts at step 1).")
    min_increment: FiniteFloat = Field(0.005, gt=0.0, lt=1.0,
                                 description="Stop raising when the increment after rollbacks falls below this.")

    @field_validator("max_drop")
    @classmethod
    def _non_negative(cls, v: float) -> float:
        if v < 0:
            raise ValueError(f"max_drop={v!r} is invalid: the allowed drop must be >= 0 (0 = no drop at all)")
        return v

    @property
    def minimise(self) -> bool:
        if self.mode is not None:
            return self.mode == "min"
        return any(word in self.metric.lower() for word in _MINIMISED)

    def allowed(self, baseline: float) -> float:
        """The worst metric value that still passes."""
        drop = self.max_drop * abs(baseline) if self.relative else self.max_drop
        return baseline + drop if self.minimise else baseline - drop

    def passes(self, value: float, baseline: float) -> bool:
        bound = self.allowed(baseline)
        return value <= bound if self.minimise else value >= bound
