"""A config's steps resolved for one run: fractions of the run become absolute optimizer steps.

`~prune_callbacks.core.config.PruningConfig` validates steps as given (an ``int`` step or a ``float``
fraction); once the run's total number of optimizer steps is known, `resolve_steps` turns them
into a `ResolvedSchedule` (checking that the schedule fits in the run, and shortening a default
``update_every`` that would leave fewer than `MIN_MASK_UPDATES` mask updates), and
`build_schedule` makes the registered schedule for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Union

from pydantic import BaseModel, ConfigDict

from prune_callbacks.core.config_errors import PruningConfigError
from prune_callbacks.core.registry import SCHEDULES

if TYPE_CHECKING:
    from prune_callbacks.core.config import PruningConfig

#: below this many mask updates in the pruning window, a default ``update_every`` is shortened
MIN_MASK_UPDATES = 4

#: the fields of a schedule with a window: sparsity from ``initial_sparsity`` at ``start_step`` to the final one at
#: ``end_step``, masks recomputed every ``update_every`` steps (what `~prune_callbacks.methods.schedule.Schedule.reads`
#: says unless a schedule reads fewer, as ``oneshot`` does)
WINDOW_FIELDS = frozenset({"initial_sparsity", "end_step", "update_every"})


class ResolvedSchedule(BaseModel):
    """Absolute optimizer steps of one run (``update_every`` as used: see `PruningConfig.update_every`)."""

    model_config = ConfigDict(frozen=True)
    start_step: int
    end_step: int
    l1_ramp_steps: int
    update_every: int


def absolute_step(value: Union[int, float], total_steps: Optional[int]) -> int:
    """An int step as it is; a float fraction of a run of ``total_steps`` (known by then) rounded to a step."""
    return int(round(value * total_steps)) if isinstance(value, float) else int(value)


def _own_reads(config: "PruningConfig") -> frozenset[str]:
    """The window fields ``config``'s registered schedule reads (`Schedule.reads`; one that does not say reads all)."""
    return getattr(SCHEDULES.get(config.schedule), "reads", WINDOW_FIELDS)


def windowed(config: "PruningConfig") -> bool:
    """Whether ``config``'s schedule has a window ending at ``end_step`` (``oneshot`` has none)."""
    return "end_step" in _own_reads(config)


def schedule_reads(config: "PruningConfig") -> frozenset[str]:
    """The window fields a run of ``config`` reads: its schedule's and, with an accuracy guard, ``end_step`` and
    ``update_every`` (the guard raises sparsity again on the update grid continued past ``end_step``)."""
    reads = _own_reads(config)
    return reads | {"end_step", "update_every"} if config.accuracy_guard is not None else reads


def resolve_steps(config: "PruningConfig", total_steps: Optional[int]) -> ResolvedSchedule:
    """``config``'s steps as absolute optimizer steps of a run of ``total_steps`` (`PruningConfig.resolve`)."""
    if total_steps is None and config.uses_fractions():
        fractional = [n for n in config.step_fields() if isinstance(getattr(config, n), float)]
        raise PruningConfigError(
            f"{', '.join(f'{n}={getattr(config, n)!r}' for n in fractional)} "
            "are fractions of the run, but the total number of optimizer steps is unknown: "
            "pass total_steps=... or give absolute int steps"
        )
    start = absolute_step(config.start_step, total_steps)
    end = absolute_step(config.end_step, total_steps) if "end_step" in schedule_reads(config) else start
    window = windowed(config)
    problems = []
    if window and end < start:
        problems.append(("end_step", f"end_step resolves to {end}, before start_step {start}"))
    if total_steps is not None:
        if end > total_steps and window:
            problems.append((
                "end_step",
                f"end_step={config.end_step!r} resolves to step {end}, beyond the run's {total_steps} optimizer "
                f"steps: final_sparsity={config.final_sparsity} would never be reached (use end_step <= {total_steps} "
                "or a fraction such as 0.7)"
            ))
        if start > total_steps:
            problems.append(("start_step", f"start_step={config.start_step!r} resolves to step {start}, beyond the run's "
                                           f"{total_steps} steps"))
    if problems:
        raise PruningConfigError("; ".join(m for _, m in problems), problems)  # the problems as data too
    every = config.update_every
    if "update_every" not in config.model_fields_set and window and end - start < MIN_MASK_UPDATES * every:
        every = max(1, (end - start) // 8)
    return ResolvedSchedule(start_step=start, end_step=end, l1_ramp_steps=absolute_step(config.l1_ramp_steps, total_steps),
                            update_every=every)


def build_schedule(config: "PruningConfig", resolved: ResolvedSchedule):
    """The registered `~prune_callbacks.methods.schedule.Schedule` of ``config`` for these absolute steps."""
    return SCHEDULES.get(config.schedule)(
        initial=config.initial_sparsity, final=config.final_sparsity,
        start=resolved.start_step, end=resolved.end_step, every=resolved.update_every,
    )
