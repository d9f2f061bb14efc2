"""The dense baseline of a pruning run: when to evaluate it and how (``dense_*`` metrics).

``trainer.evaluate(metric_key_prefix="dense")`` is the public API for it: it
logs ``dense_*`` metrics and returns them, and -- unlike an evaluation requested
with ``control.should_evaluate`` -- it does not take part in best-model
selection, hyper-parameter-search reporting or a ``ReduceLROnPlateau`` step.
So the callbacks need the Trainer for it (``callbacks.bind(trainer)``).
No transformers import here (the recipe schema reads `DENSE_TIMINGS`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Optional, Union

from prune_callbacks.core.config import PruningConfigError

if TYPE_CHECKING:
    from transformers import Trainer

DenseTiming = Union[bool, Literal["train_begin", "before_pruning"]]
DENSE_TIMINGS = ("train_begin", "before_pruning")


def dense_timing(value: Any) -> Optional[str]:
    """``evaluate_dense`` as ``None`` (off), ``"train_begin"`` or ``"before_pruning"``; ``True`` is ``"train_begin"``."""
    if value is None or value is False:
        return None
    if value is True:
        return "train_begin"
    if isinstance(value, str) and value in DENSE_TIMINGS:
        return value
    raise PruningConfigError(f"evaluate_dense={value!r} is invalid; allowed: False, True (same as 'train_begin'), "
                             "'train_begin', 'before_pruning'")


def evaluate_dense(trainer: "Trainer", eval_dataset: Any = None, metric_key_prefix: str = "dense") -> dict:
    """``trainer.evaluate`` with metrics named ``dense_*``: call it before pruning starts (the callbacks'
    ``evaluate_dense`` calls it at train begin or just before the first mask update) to log the dense
    baseline next to the ``eval_*`` metrics of the pruned model."""
    if eval_dataset is None and trainer.eval_dataset is None:
        raise ValueError("evaluate_dense needs an eval_dataset (on the Trainer or as an argument)")
    return trainer.evaluate(eval_dataset=eval_dataset, metric_key_prefix=metric_key_prefix)
