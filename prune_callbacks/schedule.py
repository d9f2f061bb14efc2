"""Sparsity schedules as pure functions of the optimizer step.

Zhu & Gupta (2017), "To prune, or not to prune":

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3     for t0 <= t <= t1

Before ``t0`` nothing is pruned, after ``t1`` ``s_f`` is held. Masks are
recomputed at ``t0, t0 + dt, t0 + 2 dt, ...`` and at ``t1`` itself, so the final
sparsity is reached exactly at ``end_step`` whatever ``update_every`` is.
"""

from __future__ import annotations


def target_sparsity(
    step: int,
    *,
    initial: float,
    final: float,
    start: int,
    end: int,
    kind: str = "cubic",
) -> float:
    """Sparsity the schedule asks for after ``step`` optimizer steps."""
    if step < start:
        return 0.0
    if kind == "oneshot" or step >= end or end == start:
        return final
    progress = (step - start) / (end - start)
    if kind == "cubic":
        return final + (initial - final) * (1.0 - progress) ** 3
    if kind == "linear":
        return initial + (final - initial) * progress
    raise ValueError(f"schedule={kind!r} is unknown; valid: cubic, linear, oneshot")


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
