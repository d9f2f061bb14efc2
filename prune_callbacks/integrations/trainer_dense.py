"""Moved to :mod:`prune_callbacks.integrations.trainer.dense` (kept so old imports keep working)."""

from .trainer.dense import DENSE_TIMINGS, DenseTiming, dense_timing, evaluate_dense

__all__ = ["DENSE_TIMINGS", "DenseTiming", "dense_timing", "evaluate_dense"]
