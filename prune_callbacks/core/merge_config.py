"""`MergeConfig`: the ``merge:`` setting of a pruning config (fold removed FFN neurons into the kept ones,
removed blocks into the kept block before them; :mod:`prune_callbacks.methods.structured.merging` and
:mod:`~prune_callbacks.methods.structured.block_merging` do it). A config model only, so the core config can embed it."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class MergeConfig(BaseModel):
    """``merge:`` of a pruning config (granularity ``ffn_neurons`` or ``blocks``); ``merge: true`` takes the defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    damping: float = Field(0.01, description="Ridge term as a fraction of the mean diagonal of the inputs' second moments, > 0.")
    calibration_steps: int = Field(
        16, description="Optimizer steps before a mask update whose forward passes give the statistics (>= 1). "
        "ffn_neurons: updates closer than this share one window, each fold using all its tokens so far; blocks: at "
        "most the steps since the previous update count. 4 collapsed a MiniLM run (too few tokens per input).")
    select: Literal["saliency", "fold"] = Field(
        "saliency", description="Which units an update removes: 'saliency' (the pruning saliency's choice) or 'fold' "
        "(as many, the ones whose fold leaves the least error on the calibration tokens, greedily; ffn_neurons: in "
        "each block, by optimal brain surgeon on the output projection).")

    @model_validator(mode="before")
    @classmethod
    def _true(cls, data: Any) -> Any:
        return {} if data is True else data

    @field_validator("damping")
    @classmethod
    def _damping(cls, v: float) -> float:
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"damping={v!r} is invalid: must be a finite number > 0 (0.01 is the usual choice)")
        return v

    @field_validator("calibration_steps")
    @classmethod
    def _steps(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"calibration_steps={v!r} is invalid: must be an integer >= 1")
        return v
