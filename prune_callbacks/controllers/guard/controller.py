"""`AccuracyGuard`: a ``control``-phase step component that holds or rolls back one group's sparsity.

The adapter measures the dense baseline before pruning starts (`set_baseline`) and then
reports the guarded metric every few steps (`report_metric`). Each report is a decision on
the sparsity the current masks were computed for (``s``):

``continue``
    within ``max_drop`` of the baseline: ``s`` becomes the *last good* sparsity (its masks
    are kept) and the schedule keeps raising, capped by the ``ceiling``.
``hold``
    outside: the schedule is capped at ``s`` so the model can recover by training.
``rollback``
    still outside after ``patience`` consecutive evaluations at ``s``: the masks go back to
    the last good ones, the weights pruned since then get their values back, and the
    ceiling becomes ``good + (s - good) / 2`` (a smaller increment). From then on it bisects:
    a pass at the ceiling moves it halfway to the lowest failed sparsity, a rollback halfway
    from the last good one.
``stop``
    the next increment would be below ``min_increment``: sparsity stays at the last good value.

The schedule override is `GuardedSchedule`: it wraps the group's own schedule and caps its
value; after the schedule's ``end`` it keeps updating on the same grid while the cap allows
more (so a lowered ceiling can still be climbed).

Memory of a rollback: the masks at the last good point (1 byte per targeted weight, bool)
plus, for only the weights pruned since then, their fp32 value just before the mask update
that pruned them (4 bytes each). During a mask update step a temporary copy of the
group's weights is taken to capture those values and freed in the same step.

`final_check` is the run's answer: it evaluates at the final sparsity; if that fails it rolls
back to the last good masks and evaluates again, so the reported metric is always measured
at the reported sparsity, after recovery, never a stale best.

Under torch.distributed every reported value is broadcast from rank 0, so every process
takes the same decision. Pure torch.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from prune_callbacks.core.distributed import collective_device
from prune_callbacks.core.config_errors import PruningConfigError
from prune_callbacks.methods.schedule import Schedule
from prune_callbacks.methods.steps.base import StepComponent
from prune_callbacks.core.guard_config import AccuracyGuardConfig

DECISIONS = ("baseline", "continue", "hold", "rollback", "stop", "final")
_EPS = 1e-9


class GuardedSchedule(Schedule):
    """A group's schedule with its value capped by the guard (``min(inner, cap)``)."""

    name = "guarded"

    def __init__(self, inner: Schedule, guard: "AccuracyGuard"):
        self.inner, self.guard = inner, guard
        self.initial, self.final, self.start, self.end, self.every = inner.initial, inner.final, inner.start, inner.end, inner.every
        self.grid = inner.grid

    def value(self, step: int) -> float:
        return min(self.inner.value(step), self.guard.cap())

    def is_update_step(self, step: int) -> bool:
        if self.inner.is_update_step(step):
            return True
        return self.inner.continues_grid(step) and self.value(step) > self.guard.group.mask_sparsity + _EPS

    def first_update_step(self) -> int:
        return self.inner.first_update_step()

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


class AccuracyGuard(StepComponent):
    phase = "control"
    name = "accuracy_guard"

    def __init__(self, group: Any, config: AccuracyGuardConfig):
        if not group.granularity.elementwise:
            raise ValueError(f"accuracy_guard needs weight-shaped masks; granularity={group.config.granularity!r} "
                             "is structured (valid: unstructured, N:M)")
        self.group, self.config = group, config
        self.baseline: Optional[float] = None
        self.ceiling = float(group.config.final_sparsity)
        self.increment: Optional[float] = None  # None until the first rollback
        self.failed: Optional[float] = None  # lowest sparsity rolled back from
        self.good_sparsity = 0.0
        self.good_masks = [m.clone() for m in group.masks]
        self.snapshot: list[torch.Tensor] = [torch.empty(0, dtype=torch.float32, device=m.device) for m in group.masks]
        self.holding = False
        self.failures = 0
        self.stopped = False
        self.trajectory: list[dict] = []
        self.final: Optional[dict] = None
        self._pre: Optional[tuple[list[torch.Tensor], list[torch.Tensor]]] = None
        self.install()

    # ------------------------------------------------------------ schedule override
    def install(self) -> None:
        """Wrap the group's schedule (again, if the group rebuilt it, e.g. on ``set_total_steps``)."""
        if not (isinstance(self.group.schedule, GuardedSchedule) and self.group.schedule.guard is self):
            self.group.schedule = GuardedSchedule(self.group.schedule, self)

    def cap(self) -> float:
        if self.holding or self.stopped:
            return self.group.mask_sparsity
        return self.ceiling

    # ------------------------------------------------------------ around the step
    @torch.no_grad()
    def after_step(self, step: int, optimizer: Any) -> None:
        self.install()
        g = self.group
        if g.schedule.is_update_step(step) and g.schedule.value(step) > g.mask_sparsity + _EPS:
            self._pre = ([m.clone() for m in g.masks], [p.detach().to(torch.float32, copy=True) for p in g.params])

    @torch.no_grad()
    def apply(self) -> None:
        """After the mask update of this step: keep the values of the weights it pruned (see the module docstring)."""
        if self._pre is None:
            return
        before_masks, before_values = self._pre
        self._pre = None
        for i, (mask, before, values, good) in enumerate(zip(self.group.masks, before_masks, before_values, self.good_masks)):
            new_since, prev_since = mask & ~good, before & ~good
            fresh = mask & ~before
            if not bool(fresh.any()):
                continue
            out = torch.empty(int(new_since.sum()), dtype=torch.float32, device=mask.device)
            was = prev_since[new_since]
            out[was] = self.snapshot[i]
            out[~was] = values[fresh]
            self.snapshot[i] = out

    # ------------------------------------------------------------ decisions
    def _broadcast(self, value: float) -> float:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            t = torch.tensor([float(value)], dtype=torch.float64, device=collective_device())
            torch.distributed.broadcast(t, src=0)
            return float(t.item())
        return float(value)

    def _record(self, step: int, value: float, decision: str, sparsity: Optional[float] = None) -> str:
        """One trajectory row: the sparsity the metric was measured at (before a rollback acts)."""
        sparsity = self.group.mask_sparsity if sparsity is None else sparsity
        self.trajectory.append({"step": int(step), "sparsity": float(sparsity), "metric": float(value),
                                "decision": decision})
        return decision

    def passes(self, value: float) -> bool:
        return self.config.passes(value, self.baseline)

    def set_baseline(self, value: float, step: int = 0) -> None:
        """The dense model's metric, measured in this run before pruning starts."""
        self.baseline = self._broadcast(value)
        self._record(step, self.baseline, "baseline")

    def report_metric(self, value: float, step: int) -> str:
        """Decide on the current sparsity given the metric measured there; returns the decision."""
        if self.baseline is None:
            raise RuntimeError("AccuracyGuard.report_metric before set_baseline: measure the dense model first")
        value = self._broadcast(value)
        s = self.group.mask_sparsity
        if self.passes(value):
            self.holding, self.failures = False, 0
            self._mark_good()
            if self.failed is not None and not self.stopped and s >= self.ceiling - _EPS:
                self._bisect()
            return self._record(step, value, "stop" if self.stopped else "continue")
        self.failures += 1
        if self.failures < self.config.patience or s <= self.good_sparsity + _EPS:
            self.holding = True
            return self._record(step, value, "hold")
        decision = self._roll_back(s)
        return self._record(step, value, decision, s)

    def _mark_good(self) -> None:
        self.good_sparsity = float(self.group.mask_sparsity)
        self.good_masks = [m.clone() for m in self.group.masks]
        self.snapshot = [torch.empty(0, dtype=torch.float32, device=m.device) for m in self.group.masks]

    @torch.no_grad()
    def _roll_back(self, failed: float) -> str:
        self.restore_good()
        self.failed = failed
        self.holding, self.failures = False, 0
        return "stop" if self._bisect() else "rollback"

    def _bisect(self) -> bool:
        """Next ceiling halfway between the last good and the lowest failed sparsity; True if that step is too small."""
        self.increment = (self.failed - self.good_sparsity) / 2.0
        if self.increment < self.config.min_increment:
            self.stopped = True
            self.ceiling = self.good_sparsity
            return True
        self.ceiling = self.good_sparsity + self.increment
        return False

    @torch.no_grad()
    def restore_good(self) -> None:
        """Masks back to the last good ones; weights pruned since then get their saved values."""
        g = self.group
        for param, mask, good, values in zip(g.params, g.masks, self.good_masks, self.snapshot):
            since = mask & ~good
            if values.numel():
                param.data[since] = values.to(param.dtype)
        g.granularity.set_masks(self.good_masks)
        g.mask_sparsity = self.good_sparsity
        self.snapshot = [torch.empty(0, dtype=torch.float32, device=m.device) for m in g.masks]
        g.apply()

    def final_check(self, evaluate, step: int) -> dict:
        """The run's answer: the metric at the final sparsity; rolled back to the last good masks if it fails."""
        value = self._broadcast(evaluate())
        if not self.passes(value) and self.group.mask_sparsity > self.good_sparsity + _EPS:
            self._record(step, value, "rollback")
            self.restore_good()
            self.stopped = True
            value = self._broadcast(evaluate())
        self._record(step, value, "final")
        self.final = {"sparsity": float(self.group.mask_sparsity), "metric": float(value), "met": self.passes(value),
                      "baseline": self.baseline}
        return self.final

    # ------------------------------------------------------------ results and state
    def figures(self) -> dict:
        from prune_callbacks.core import figures

        if not self.trajectory:
            return {}
        last = self.trajectory[-1]
        return {figures.GUARD_SPARSITY: last["sparsity"], figures.GUARD_METRIC: last["metric"],
                figures.GUARD_DECISION: figures.GUARD_DECISION_CODES[last["decision"]]}

    def report(self) -> dict:
        return {"metric": self.config.metric, "baseline": self.baseline, "good_sparsity": self.good_sparsity,
                "ceiling": self.ceiling, "trajectory": list(self.trajectory), "final": self.final,
                "snapshot_bytes": sum(4 * v.numel() for v in self.snapshot) + sum(m.numel() for m in self.good_masks)}

    def state_dict(self) -> dict:
        """``json``: JSON-able decisions state; ``tensors``: good masks and the snapshot values."""
        tensors = {}
        for i, (m, v) in enumerate(zip(self.good_masks, self.snapshot)):
            tensors[f"good_masks/{i}"] = m.clone()
            tensors[f"snapshot/{i}"] = v.clone()
        return {"json": {"baseline": self.baseline, "ceiling": self.ceiling, "increment": self.increment,
                         "failed": self.failed, "good_sparsity": self.good_sparsity, "holding": self.holding, "failures": self.failures,
                         "stopped": self.stopped, "trajectory": list(self.trajectory), "final": self.final},
                "tensors": tensors}

    def load_state_dict(self, state: dict) -> None:
        js, tensors = state["json"], state["tensors"]
        for k in ("baseline", "ceiling", "increment", "failed", "good_sparsity", "holding", "failures", "stopped", "final"):
            setattr(self, k, js[k])
        self.trajectory = [dict(r) for r in js["trajectory"]]
        n = len(self.group.masks)
        self.good_masks = [tensors[f"good_masks/{i}"].to(self.group.masks[i].device).clone() for i in range(n)]
        self.snapshot = [tensors[f"snapshot/{i}"].to(self.group.masks[i].device).clone() for i in range(n)]
        self._pre = None


def metric_value(metrics: Any, config: AccuracyGuardConfig, hint: str = "") -> float:
    """The guarded metric out of what an evaluation returned (a mapping of metrics, or one number)."""
    if isinstance(metrics, (int, float)) and not isinstance(metrics, bool):
        return float(metrics)
    key = config.metric
    if not isinstance(metrics, dict) or key not in metrics:
        got = ", ".join(sorted(map(str, metrics))) if isinstance(metrics, dict) else f"a {type(metrics).__name__}"
        message = (f"accuracy_guard.metric={key!r} is not among the evaluation's metrics; it returned: "
                   f"{got}{f' ({hint})' if hint else ''}")
        raise PruningConfigError(message, [("accuracy_guard.metric", message)])  # a setting to fix, not a crash
    return float(metrics[key])


def baseline_step(pruner: Any, config: AccuracyGuardConfig) -> int:
    """The pruner step after which the baseline is measured: 0 (before any step) for ``train_begin``, else the
    last step before the first mask update (`Pruner.last_dense_step`)."""
    last_dense = None if config.baseline == "train_begin" else pruner.last_dense_step()
    return 0 if last_dense is None else last_dense


def baseline_due(pruner: Any, guards: list[AccuracyGuard]) -> list[AccuracyGuard]:
    """The guards whose baseline is to be measured now (none measured yet, and this is their step, still dense)."""
    if pruner.finalized or pruner.mask_updates > 0:
        return []
    return [g for g in guards if g.baseline is None and pruner.step == baseline_step(pruner, g.config)]


def evaluation_due(pruner: Any, guards: list[AccuracyGuard]) -> bool:
    """Whether the guards want an evaluation after this optimizer step (every ``every`` steps once masks exist)."""
    if not guards or pruner.finalized or pruner.mask_updates == 0:
        return False
    return any(pruner.step % g.config.every == 0 for g in guards)


def add_guards(pruner: Any) -> list[AccuracyGuard]:
    """An `AccuracyGuard` for each pruning group whose config has ``accuracy_guard`` (added to the pruner)."""
    guards = []
    for group in pruner.groups:
        if group.config.accuracy_guard is not None:
            guard = AccuracyGuard(group, group.config.accuracy_guard)
            pruner.add_component(guard)
            guards.append(guard)
    return guards
