"""Offline evaluation metrics.

``evaluate.load("accuracy")`` downloads the metric script from the Hub and
fails offline.  The scripts of the metrics we need live next to this file
(``<name>/<name>.py``, standard ``evaluate.Metric`` modules computed with
numpy) and :func:`load_metric` hands their local path to ``evaluate.load``,
which imports them without any network access.  ``evaluate`` is imported
lazily.  Causal-LM perplexity comes from the eval loss: :func:`perplexity`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["METRICS_DIR", "available_metrics", "metric_script_path", "load_metric", "perplexity"]

METRICS_DIR = Path(__file__).resolve().parent


def available_metrics() -> list[str]:
    """Names accepted by :func:`load_metric` (``["accuracy", "f1"]``)."""
    return sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())


def metric_script_path(name: str) -> Path:
    script = METRICS_DIR / name / f"{name}.py"
    if "/" in name or "\\" in name or not script.is_file():
        raise ValueError(f"no offline metric {name!r}; available: {available_metrics()}")
    return script


def load_metric(name: str, **kwargs: Any):
    """``evaluate.load`` of the bundled local metric script ``name``.

    Returns an ``evaluate.EvaluationModule``: ``load_metric("accuracy").compute(
    predictions=[...], references=[...])`` -> ``{"accuracy": ...}``.  ``kwargs``
    go to ``evaluate.load`` (``experiment_id``, ``keep_in_memory``, ...).  The
    script is copied into the ``evaluate`` modules cache (``HF_MODULES_CACHE``)
    and imported from there; no network access happens.
    """
    script = metric_script_path(name)
    import evaluate

    return evaluate.load(str(script), **kwargs)


def perplexity(eval_loss: float | Mapping[str, Any]) -> float:
    """``exp(eval_loss)``, the perplexity of a causal LM whose loss is the mean token NLL.

    Accepts the loss or a metrics dict holding ``"eval_loss"`` (as returned by
    ``Trainer.evaluate()``).  Overflow gives ``inf``; NaN stays NaN.
    """
    if isinstance(eval_loss, Mapping):
        if "eval_loss" not in eval_loss:
            raise KeyError(f"no 'eval_loss' in metrics {sorted(eval_loss)}")
        eval_loss = eval_loss["eval_loss"]
    loss = float(eval_loss)
    if math.isnan(loss):
        return math.nan
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf
