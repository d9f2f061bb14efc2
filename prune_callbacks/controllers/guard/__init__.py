"""Accuracy-guarded adaptive sparsity: raise sparsity while an evaluation metric stays within a drop of the dense
baseline; hold, then roll back to the last good sparsity when it does not (issue 15).

* :mod:`.config`: `AccuracyGuardConfig` (``PruningConfig(accuracy_guard={...})``);
* :mod:`.controller`: `AccuracyGuard`, a pure-torch ``control``-phase step component;
* adapters feed it metrics: :mod:`prune_callbacks.integrations.trainer.guard` (HF Trainer: its own
  ``eval_dataset`` / ``compute_metrics``) and :mod:`prune_callbacks.integrations.accelerate.guard`
  (``AcceleratePruningHook.register(..., evaluate=fn)``).
"""

from prune_callbacks.core.guard_config import AccuracyGuardConfig
from prune_callbacks.controllers.guard.controller import AccuracyGuard, GuardedSchedule

__all__ = ["AccuracyGuardConfig", "AccuracyGuard", "GuardedSchedule"]
