"""Step components: what rides each real optimizer step, in one defined order.

The `~prune_callbacks.engine.pruner.Pruner` owns a list of components and calls them
around every *real* optimizer step (never on accumulation micro-steps, never on
a step a ``GradScaler`` skips):

before ``optimizer.step()`` (gradients accumulated, unscaled)
    1. every component's :meth:`prepare` reads the gradients it needs and says
       whether they are finite;
    2. only if *all* were finite, every component's :meth:`commit` folds them in
       (saliency EMAs); otherwise the step is marked skipped and nothing changes.
    3. on a step that is not skipped, an attached Pruner multiplies every param group's
       learning rate by the product of the components' :meth:`lr_factor` (1.0 unless a
       `~.recovery.RecoveryRate` is on) and puts the rates back right after the step.

after ``optimizer.step()``, in phase order (``PHASES``), list order within a phase
    1. ``regularize``: the proximal L1 step (:mod:`.l1`);
    2. ``control``: controllers that hold or move a group's target (e.g. an
       accuracy guard) read the state and adjust schedules;
    3. ``masks``: pruning groups (:mod:`.pruning`) recompute masks when their
       schedule says so;
    4. every component's :meth:`apply`: pruned weights are written to +0.0, so
       whatever the optimizer or L1 did, they are exactly zero.

Forward-time companions (a distillation teacher) do not ride the optimizer step
and live outside this list.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

PHASES = ("regularize", "control", "masks")


class StepComponent:
    """Base class; every hook is optional."""

    phase: ClassVar[str] = "masks"
    name: ClassVar[str] = "component"

    def prepare(self, grad_scale: Optional[float]) -> bool:
        """Read this step's gradients; return False if any is non-finite (the step is then skipped)."""
        return True

    def commit(self) -> None:
        """Fold what :meth:`prepare` read (called only when every component's gradients were finite)."""

    def discard(self) -> None:
        """Drop what :meth:`prepare` read (the step is skipped)."""

    def after_step(self, step: int, optimizer: Any) -> None:
        """Act after optimizer step number ``step`` (1-based)."""

    def lr_factor(self, step: int) -> float:
        """The multiple of the optimizer's learning rate for optimizer step ``step`` (1-based), applied by an
        attached `Pruner` for that step only (:mod:`.recovery`); 1.0 = unchanged."""
        return 1.0

    def apply(self) -> None:
        """Re-impose masks after everything else ran."""

    def finalize(self) -> None:
        """Make the effect permanent and free buffers."""

    def report(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
