"""`PruningConfig`: the validated description of one pruning run.

The same object is taken by the core `Pruner`, the Trainer callbacks, the
Accelerate hook and the ``pruning:`` section of a recipe. Unknown keys are
rejected and every error names the field, the bad value and what is allowed.

Steps (``start_step``, ``end_step``, ``l1_ramp_steps``) are *optimizer* steps.
An ``int`` is an absolute step; a ``float`` in ``[0, 1]`` is a fraction of the
run, resolved once the total number of optimizer steps is known
(:meth:`PruningConfig.resolve`, done by :mod:`.resolution`).

`PruningConfigError` and the formatting of pydantic's errors live in :mod:`.config_errors`
(re-exported here).
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal, Optional, Union

from pydantic import ConfigDict, Field, StrictInt, field_validator, model_validator

from prune_callbacks.core.config_errors import (  # noqa: F401 (re-exported: `from prune_callbacks.core.config import PruningConfigError` etc.)
    FiniteFloat, PruningConfigError, _allowed_keys, _RaisesConfigError, _Validated, check_finite,
    format_validation_error, list_allowed_keys, validation_problems,
)
from prune_callbacks.core.guard_config import AccuracyGuardConfig
from prune_callbacks.core.unit_description import UnitDescription
from prune_callbacks.core.merge_config import MergeConfig
from prune_callbacks.core.registry import GRANULARITIES, SALIENCIES, SCHEDULES
from prune_callbacks.core import resolution
from prune_callbacks.core.resolution import MIN_MASK_UPDATES, ResolvedSchedule, absolute_step  # noqa: F401 (re-exported)

Step = Union[StrictInt, float]  # the float part is checked finite in `PruningConfig._step`

SCOPES = ("global", "per_layer")


class PruningConfig(_Validated):
    """What to prune, how to score weights, and how fast to raise sparsity.

    Defaults were chosen from ``benchmarks/quality.py`` (BENCHMARKS.md, MiniLM on Rotten
    Tomatoes at 90%): taylor saliency with one global threshold kept 74.9% test accuracy against
    61.8% for per-layer magnitude; ``update_every`` 25 matched 10 (75.1 vs 74.9) at 2.5x fewer
    mask updates; ``beta`` 0.95, an earlier ``end_step`` (0.5), a 0.98 per-layer cap and L1 did
    not help (74.7, 73.7, 74.6, 75.0: all within noise), so the simpler settings stay.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    final_sparsity: FiniteFloat = Field(0.9, description="Fraction of targeted weights that are zero at the end, in [0, 1).")
    initial_sparsity: FiniteFloat = Field(0.0, description="Sparsity applied at start_step, in [0, final_sparsity].")
    start_step: Step = Field(0.1, description="First optimizer step of the schedule (int) or fraction of the run (float).")
    end_step: Step = Field(0.7, description="Step at which final_sparsity is reached (int) or fraction of the run (float).")
    update_every: StrictInt = Field(
        25, description="Masks are recomputed every this many optimizer steps. Left at the default, it is shortened "
        f"when the pruning window would see fewer than {MIN_MASK_UPDATES} updates (window // 8, at least 1).")
    schedule: str = Field("cubic", description="A registered schedule: cubic, linear, oneshot, or your own. oneshot "
                          "prunes once, at start_step, and refuses end_step, update_every and initial_sparsity "
                          "(unless an accuracy_guard reads the first two).")

    granularity: str = Field(
        "unstructured", description="How masks are shaped: 'unstructured', 'N:M' (e.g. '2:4'), 'N:M-srste' "
        "(e.g. '2:4-srste'), or a registered one.")
    granularity_settings: dict[str, Any] = Field(
        default_factory=dict, description="The granularity's own settings (its `Settings`; e.g. low_rank: "
        "importance, projection; N:M-srste: decay); an error for a granularity without them.")

    units: Optional[UnitDescription] = Field(
        None, description="Structured granularities on your own architecture: where its blocks, FFN neurons and heads "
        "are (module-name regexes; prune_callbacks.core.unit_description). None = the built-in family table.")

    merge: Optional[MergeConfig] = Field(
        None, description="ffn_neurons / blocks: fold removed neurons into the kept ones, removed blocks into the kept "
        "block before them, by a least-squares refit of an FFN output projection at each mask update ({} or true for "
        "the defaults; prune_callbacks.methods.structured.merging / block_merging). None = drop them.")

    saliency: str = Field("taylor", description="A registered saliency: taylor, platon, magnitude, movement, unit_taylor (structured units only), or your own.")
    beta: FiniteFloat = Field(0.85, description="EMA factor of the taylor and unit_taylor scores and of platon's importance.")
    uncertainty_beta: FiniteFloat = Field(0.95, description="EMA factor of platon's uncertainty term.")

    scope: Literal["global", "per_layer"] = Field("global", description="unstructured: one global threshold or the same fraction per layer.")
    min_layer_sparsity: FiniteFloat = Field(0.0, description="global scope: no target is pruned below this (capped by the current target).")
    max_layer_sparsity: FiniteFloat = Field(1.0, description="global scope: no target is pruned above this.")

    include: Optional[list[str]] = Field(
        None, description="Regexes (re.search) over module names; None = every Linear inside the repeated blocks."
    )
    exclude: list[str] = Field(default_factory=list, description="Regexes over module names removed from the targets.")

    l1_lambda: FiniteFloat = Field(0.0, description="Strength of the proximal L1 step on targeted weights (0 = off).")
    l1_ramp_steps: Step = Field(0, description="L1 strength grows linearly from 0 over this many steps (or fraction).")

    recovery_lr_scale: FiniteFloat = Field(
        1.0, description="After the last mask update of this config's schedule (an accuracy guard may update later), "
        "the optimizer's learning rate is multiplied by this "
        "for the rest of the run, ramped in from 0 over a tenth of the steps left: a warm restart for the model the cut "
        "leaves, on top of the run's own schedule (prune_callbacks.methods.steps.recovery; needs the run's length and "
        "an attached optimizer, which the adapters always have). 1 = off.")

    sync_masks: bool = Field(True, description="Under torch.distributed, broadcast masks from rank 0 at every update.")

    accuracy_guard: Optional[AccuracyGuardConfig] = Field(
        None, description="Hold / roll back sparsity when an eval metric drops too far (prune_callbacks.controllers.guard); "
        "final_sparsity is then the upper bound.")

    # ------------------------------------------------------------------ fields
    @field_validator("saliency", "schedule", "granularity")
    @classmethod
    def _registered(cls, v: str, info) -> str:
        registry = {"saliency": SALIENCIES, "schedule": SCHEDULES, "granularity": GRANULARITIES}[info.field_name]
        if v not in registry:
            raise ValueError(f"{info.field_name}={v!r} is unknown; valid: {', '.join(registry.names())}")
        return v

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

    @field_validator("recovery_lr_scale")
    @classmethod
    def _scale(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"recovery_lr_scale={v!r} is invalid: a learning-rate multiple must be > 0 (1 = off)")
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
        check_finite(info.field_name, v)
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
        for pattern in v or []:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{info.field_name} pattern {pattern!r} is not a valid regex: {exc}") from None
        if v is not None and info.field_name == "include" and len(v) == 0:
            raise ValueError("include=[] selects nothing: omit it (null) for the default targets or list patterns")
        return v

    # ------------------------------------------------------------- whole model
    @model_validator(mode="before")
    @classmethod
    def _granularity_final(cls, data: Any) -> Any:
        """A granularity that fixes the final sparsity (N:M: 1 - N/M) supplies it when it is left out; one that
        reads a given value differently explains a bad one (`Granularity.final_sparsity_hint`)."""
        if isinstance(data, dict) and isinstance(data.get("granularity"), str):
            try:
                granularity, args = GRANULARITIES.resolve(data["granularity"])
            except KeyError:
                return data
            if "final_sparsity" in data:  # a granularity may read it differently (blocks: a fraction, not a count)
                hint = granularity.final_sparsity_hint(data["final_sparsity"], *args)
                if hint:
                    raise ValueError(hint)
                return data
            try:
                fixed = granularity.fixed_final_sparsity(*args)
            except (ValueError, ZeroDivisionError):
                fixed = None
            if fixed is not None and 0.0 < fixed < 1.0:
                data = {**data, "final_sparsity": fixed}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "PruningConfig":
        problems = self._inapplicable()
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
        if (type(self.start_step) is type(self.end_step) and resolution.windowed(self)
                and self.end_step < self.start_step):
            problems.append(
                f"end_step={self.end_step} is before start_step={self.start_step} (allowed: end_step >= start_step)"
            )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _inapplicable(self) -> list[str]:
        """Settings the user gave that the chosen parts do not read (defaults that do not apply are unused).

        A field counts as given when it was passed with a value other than its default, so a recipe
        that spells out every default (like ``template.yaml``) stays valid.
        """
        given = {f for f in self.model_fields_set if getattr(self, f) != type(self).model_fields[f].default}

        def unread(fields, part: str, reads, nothing: str) -> list[str]:
            """One problem per field of ``fields`` given although ``part`` (the chosen saliency, schedule) reads
            only ``reads``."""
            return [f"{f}={getattr(self, f)!r} does not apply to {part}={getattr(self, part)!r} (it reads "
                    f"{', '.join(reads) or nothing}); remove it" for f in fields if f in given and f not in reads]

        saliency = SALIENCIES.get(self.saliency)
        problems = unread(("beta", "uncertainty_beta"), "saliency", saliency.hyperparameters, "no hyperparameter")
        granularity, args = GRANULARITIES.resolve(self.granularity)
        if saliency.per_unit and not granularity.unit_scored:
            scored = ", ".join(n for n in GRANULARITIES.names() if n in GRANULARITIES
                               and GRANULARITIES.get(n).unit_scored)
            problems.append(f"saliency={self.saliency!r} scores whole structured units and does not apply to "
                            f"granularity={self.granularity!r} (allowed with: {scored})")
        problems += unread(sorted(resolution.WINDOW_FIELDS), "schedule", sorted(resolution.schedule_reads(self)),
                           "only start_step and final_sparsity")
        problems += granularity.check_config(self, *args)
        problems += granularity.settings_problems(self.granularity_settings, self.granularity)
        owned = set().union(*(g.config_fields for g in GRANULARITIES.classes()))
        readers = {f: ", ".join(n for n in GRANULARITIES.names() if n in GRANULARITIES
                                and f in GRANULARITIES.get(n).config_fields) for f in owned}
        problems += [
            f"{f}={getattr(self, f)!r} does not apply to granularity={self.granularity!r} (allowed with: "
            f"{readers[f]}); remove it"
            for f in sorted(owned - set(granularity.config_fields)) if f in given
        ]
        fixed = None if problems else granularity.fixed_final_sparsity(*args)
        if fixed is not None and not math.isclose(self.final_sparsity, fixed, abs_tol=1e-9):
            problems.append(
                f"final_sparsity={self.final_sparsity!r} contradicts granularity={self.granularity!r}, which ends at "
                f"sparsity {fixed:g}; leave final_sparsity out (or set it to {fixed:g})"
            )
        return problems

    # --------------------------------------------------------------- helpers
    def step_fields(self) -> list[str]:
        """The step fields a run of this config reads (``end_step`` only where the schedule has a window)."""
        end = ["end_step"] if "end_step" in resolution.schedule_reads(self) else []
        return ["start_step", *end, "l1_ramp_steps"]

    def uses_fractions(self) -> bool:
        return any(isinstance(getattr(self, f), float) for f in self.step_fields())

    def resolve(self, total_steps: Optional[int]) -> ResolvedSchedule:
        """Turn fractional steps into absolute optimizer steps for a run of ``total_steps``."""
        return resolution.resolve_steps(self, total_steps)

    def build_schedule(self, resolved: ResolvedSchedule):
        """The registered `~prune_callbacks.methods.schedule.Schedule` for these absolute steps."""
        return resolution.build_schedule(self, resolved)


class L1Config(_Validated):
    """L1 on its own: the proximal soft-threshold step on the selected weights, no pruning.

    ``Pruner(model, L1Config(l1_lambda=1e-4))`` (or in a list next to `PruningConfig` s). Within a
    `PruningConfig`, ``l1_lambda`` does the same for that config's targets.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    l1_lambda: FiniteFloat = Field(..., description="Strength of the proximal L1 step (> 0).")
    l1_ramp_steps: Step = Field(0, description="Strength grows linearly from 0 over this many steps (or fraction).")
    include: Optional[list[str]] = Field(None, description="Regexes over module names; None = the default targets.")
    exclude: list[str] = Field(default_factory=list, description="Regexes over module names removed from the targets.")

    @field_validator("l1_lambda")
    @classmethod
    def _positive(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"l1_lambda={v!r} is invalid: L1 on its own needs l1_lambda > 0")
        return v

    _step = field_validator("l1_ramp_steps")(PruningConfig._step.__func__)
    _patterns = field_validator("include", "exclude")(PruningConfig._patterns_compile.__func__)

    def resolve_ramp(self, total_steps: Optional[int]) -> int:
        ramp = self.l1_ramp_steps
        if isinstance(ramp, float) and total_steps is None:
            raise PruningConfigError(
                f"l1_ramp_steps={ramp!r} is a fraction of the run, but the total number of optimizer steps is "
                "unknown: pass total_steps=... or give an int", [("l1_ramp_steps", "fraction without total_steps")]
            )
        return absolute_step(ramp, total_steps)


list_allowed_keys(PruningConfig, L1Config)


def make_config(config: "PruningConfig | dict | None" = None, **overrides) -> PruningConfig:
    """Build a config from a dict / config / keywords, raising `PruningConfigError` with readable lines.

    From a `PruningConfig`, only the fields that were set are carried over, so the
    "does not apply" checks see what the user gave, not every default.
    """
    if isinstance(config, PruningConfig):
        data = config.model_dump(exclude_unset=True)
    elif config is None or isinstance(config, dict):
        data = dict(config or {})
    else:
        raise TypeError(f"expected a PruningConfig, a dict of its fields or None, got {type(config).__name__}")
    data.update(overrides)
    try:
        return PruningConfig(**data)
    except PruningConfigError as exc:
        raise PruningConfigError(str(exc).replace("invalid PruningConfig:", "invalid pruning config:", 1), exc.problems) from None


def make_configs(configs: Any, **overrides) -> list:
    """One config or a list of them (`PruningConfig`, `L1Config` or dicts) as a list; overrides apply to each
    `PruningConfig` (only allowed with one)."""
    items = list(configs) if isinstance(configs, (list, tuple)) else [configs]
    if not items:
        raise PruningConfigError("an empty list of configs prunes nothing: give at least one PruningConfig or L1Config")
    if overrides and len(items) > 1:
        raise PruningConfigError(f"keyword overrides ({', '.join(overrides)}) are ambiguous with {len(items)} configs: "
                                 "set them in each config")
    return [c if isinstance(c, L1Config) and not overrides else make_config(c, **overrides) for c in items]
