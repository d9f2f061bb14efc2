"""`RecoveryRate`: a higher learning rate for the model a cut leaves (``PruningConfig.recovery_lr_scale``).

After the last mask update a group's schedule plans (a one-shot block cut, the end of a gradual window; an
accuracy guard that keeps raising sparsity afterwards does not move it) the optimizer's learning rate is multiplied
by ``scale`` for the rest of the run, ramped in linearly from 0 over a tenth of the steps left: a warm restart on top
of whatever schedule the run has. On a linearly decaying schedule that is the benchmarks'
``warm_restart`` up to the ramp's shape. The `~prune_callbacks.engine.pruner.Pruner` multiplies every param
group's rate by the product of its components' `lr_factor` just before ``optimizer.step()`` and puts the rates
back right after it, so the run's scheduler (and what it logs) never sees the factor.
"""

from __future__ import annotations

from typing import Optional

from prune_callbacks.core.config_errors import PruningConfigError
from prune_callbacks.methods.steps.base import StepComponent

#: the ramp back in after the cut, as a fraction of the steps left
RAMP_FRACTION = 0.1


def ramp_steps(left: int) -> int:
    """Steps over which the rate is ramped back in when ``left`` steps follow the cut (at least 1): the one source
    of the ramp's length, for the library and the benchmarks' ``warm_restart``."""
    return max(1, int(left * RAMP_FRACTION))


class RecoveryRate(StepComponent):
    phase = "control"
    name = "recovery_rate"

    def __init__(self, group, total_steps: Optional[int] = None):
        """``group``: the `PruningGroup` whose last mask update starts the recovery (its ``schedule`` resolved)."""
        self.group, self.scale = group, group.config.recovery_lr_scale
        self.cut = self.ramp = None
        if total_steps is not None:
            self.resolve(total_steps)

    def resolve(self, total_steps: int) -> None:
        self.cut = self.group.schedule.last_update_step()
        left = total_steps - self.cut
        if left < 1:
            raise PruningConfigError(
                f"recovery_lr_scale={self.scale!r}: the last mask update is at step {self.cut} of a {total_steps}-step "
                "run, which leaves no step to recover in (end pruning earlier, or recovery_lr_scale=1)",
                [("recovery_lr_scale", "no step after the last mask update")])
        self.ramp = ramp_steps(left)

    def lr_factor(self, step: int) -> float:
        if step < 1:
            return 1.0
        if self.cut is None:
            raise PruningConfigError(
                f"recovery_lr_scale={self.scale!r} ramps over the steps after the cut: the run's length is unknown "
                "(pass total_steps=... to the Pruner or the hook)", [("recovery_lr_scale", "needs total_steps")])
        if step <= self.cut:
            return 1.0
        return self.scale * min(1.0, (step - self.cut) / self.ramp)

    def report(self) -> dict:
        return {"recovery_lr_scale": self.scale, "after_step": self.cut, "ramp_steps": self.ramp}
