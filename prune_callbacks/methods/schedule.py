"""Sparsity schedules: how far a group is pruned after each optimizer step.

Zhu & Gupta (2017), "To prune, or not to prune":

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3     for t0 <= t <= t1

Before ``t0`` nothing is pruned, after ``t1`` ``s_f`` is held. Masks are
recomputed at ``t0, t0 + dt, t0 + 2 dt, ...`` and at ``t1`` itself, so the final
sparsity is reached exactly at ``end_step`` whatever ``update_every`` is.

A `Schedule` object owns one group's steps (``start``, ``end``, the update grid,
the first update step) and its value; it is the single place the adapters ask
("when are masks first computed?"). It has ``state_dict``/``load_state_dict``
so a stateful schedule (or a controller that holds or moves the target) resumes
exactly. The pure functions below are the built-ins' arithmetic.
"""

from __future__ import annotations

from typing import ClassVar

from prune_callbacks.core.registry import register_schedule
from prune_callbacks.core.resolution import WINDOW_FIELDS


def target_sparsity(step: int, *, initial: float, final: float, start: int, end: int, kind: str = "cubic") -> float:
    """Sparsity the built-in schedule ``kind`` asks for after ``step`` optimizer steps (`Schedule.value`)."""
    if kind not in _BUILT_INS:
        raise ValueError(f"schedule={kind!r} is unknown; valid: cubic, linear, oneshot")
    return _BUILT_INS[kind](initial=initial, final=final, start=start, end=end, every=1).value(step)


def is_update_step(step: int, *, start: int, end: int, every: int, kind: str = "cubic") -> bool:
    """Whether masks are recomputed after optimizer step ``step`` (steps count from 1).

    Updates fall on the grid ``start, start + every, ...`` and at ``end``. Step 0
    never updates (no gradient has scored the weights yet): a schedule starting at
    0 first updates at step ``every`` (or ``end`` if sooner); ``oneshot`` at
    ``max(start, 1)``.
    """
    first = max(start, 1)
    last = max(end, first)
    if kind == "oneshot":
        return step == first
    if step < first or step > last:
        return False
    return step == last or (step - start) % every == 0


def l1_strength(step: int, *, l1_lambda: float, ramp_steps: int) -> float:
    """L1 strength after ``step`` steps: a linear ramp from 0 over ``ramp_steps``, then constant."""
    if l1_lambda == 0.0:
        return 0.0
    if ramp_steps <= 0 or step >= ramp_steps:
        return l1_lambda
    return l1_lambda * step / ramp_steps


class Schedule:
    """A group's sparsity schedule over absolute optimizer steps.

    Subclasses implement :meth:`progress` (0 at ``start``, 1 at ``end``; how far
    the run is from ``initial`` to ``final``), or :meth:`between` (the value inside the
    window), or override :meth:`value` whole. :meth:`value` is the one place of the window's
    bounds: 0 before ``start``, ``final`` from ``end`` on.
    ``every`` is the update interval; :meth:`is_update_step` follows the
    built-in grid (``start + k * every`` and ``end``).
    """

    name: ClassVar[str] = "base"
    grid: ClassVar[str] = "cubic"  # which update grid of `is_update_step` (only "oneshot" differs)
    #: the `PruningConfig` fields this schedule reads besides ``start_step`` and ``final_sparsity``; a config that
    #: gives another one (a value other than its default) is refused, naming it (`PruningConfig` validation)
    reads: ClassVar[frozenset[str]] = WINDOW_FIELDS

    def __init__(self, *, initial: float, final: float, start: int, end: int, every: int):
        self.initial, self.final, self.start, self.end, self.every = initial, final, start, end, every

    def progress(self, fraction: float) -> float:
        raise NotImplementedError

    def value(self, step: int) -> float:
        if step < self.start:
            return 0.0
        if step >= self.end or self.end == self.start:
            return self.final
        return self.between((step - self.start) / (self.end - self.start))

    def between(self, fraction: float) -> float:
        """The value at ``fraction`` of the window (``0 <= fraction < 1``)."""
        return self.initial + (self.final - self.initial) * self.progress(fraction)

    def is_update_step(self, step: int) -> bool:
        return is_update_step(step, start=self.start, end=self.end, every=self.every, kind=self.grid)

    def first_update_step(self) -> int:
        """The optimizer step (1-based) after which the first masks are computed; dense until then."""
        first = max(self.start, 1)
        for step in range(first, max(self.end, first) + 1):  # the last step is always an update step
            if self.is_update_step(step):
                return step
        return first

    def continues_grid(self, step: int) -> bool:
        """Whether ``step`` is on the update grid continued past the window's end (``end + k * every``, k >= 1):
        where a controller that keeps raising sparsity after ``end`` (the accuracy guard) updates the masks."""
        end = max(self.end, self.first_update_step())
        return step > end and (step - end) % max(self.every, 1) == 0

    def update_steps(self) -> list[int]:
        first = self.first_update_step()
        return [s for s in range(first, max(self.end, first) + 1) if self.is_update_step(s)]

    def last_update_step(self) -> int:
        """The optimizer step after which the schedule's last mask update runs (a one-shot schedule's only one)."""
        return self.update_steps()[-1]

    def state_dict(self) -> dict:
        """JSON-able state (the built-ins have none: their values are functions of the step)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@register_schedule("cubic")
class Cubic(Schedule):
    """Zhu & Gupta's cubic ramp: fast early, slow near ``final`` (the default)."""

    name = "cubic"

    def between(self, fraction: float) -> float:
        return self.final + (self.initial - self.final) * (1.0 - fraction) ** 3


@register_schedule("linear")
class Linear(Schedule):
    name = "linear"

    def progress(self, fraction: float) -> float:
        return fraction


@register_schedule("oneshot")
class OneShot(Schedule):
    """``final`` at ``max(start_step, 1)`` in one mask update (no window: ``end_step``, ``update_every`` and
    ``initial_sparsity`` are not read)."""

    name = "oneshot"
    grid = "oneshot"
    reads = frozenset()

    def between(self, fraction: float) -> float:
        return self.final


_BUILT_INS = {"cubic": Cubic, "linear": Linear, "oneshot": OneShot}
