"""The ``distillation`` entry of a run report, from the Trainer's ``log_history`` (one log-key schema:
the ``distill/*`` keys the Distiller's figures write)."""

from __future__ import annotations

from typing import Any, Optional

from prune_callbacks.core.figures import DISTILL_KEYS as KEYS  # the one log-key schema (figures.py)
from prune_callbacks.controllers.distillation.config import DistillationConfig


def distillation_summary(config: DistillationConfig, log_history: list, callbacks: Any = None) -> dict:
    """Config, teacher step / bytes (when the callback set is given), the first and last logged
    ``distill/*`` values and their history (step, values)."""
    history = [{"step": e.get("step"), **{k: e[k] for k in KEYS if k in e}}
               for e in log_history if any(k in e for k in KEYS)]
    distiller = _distiller(callbacks)
    out: dict = {"config": config.dump(), "history": history}
    if history:
        out["first"], out["last"] = history[0], history[-1]
    if distiller is not None:
        out["teacher_step"] = distiller.teacher_step
        out["teacher_bytes"] = distiller.teacher_bytes()
    return out


def _distiller(callbacks: Any) -> Optional[Any]:
    for cb in callbacks or []:
        if hasattr(cb, "distiller"):
            return cb.distiller
    return None
