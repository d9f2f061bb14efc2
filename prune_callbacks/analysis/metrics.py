"""The metric of a model on batches, in plain torch: accuracy, f1 (binary, or macro over classes),
perplexity (exp of the token-weighted mean loss) or loss."""

from __future__ import annotations

import math
from typing import Iterable

import torch

METRICS = ("accuracy", "f1", "perplexity", "loss")
HIGHER_IS_BETTER = {"accuracy": True, "f1": True, "perplexity": False, "loss": False}


def standard_error(p: float, rows: int) -> float:
    """Standard error of a proportion (accuracy) ``p`` measured on ``rows`` rows."""
    return math.sqrt(max(p * (1 - p), 1e-12) / max(1, rows))


def noise(metric: str, baseline: float, rows: int) -> float:
    """How far a metric can move by sampling noise alone: two standard errors of an accuracy / f1 on
    ``rows`` held-out rows; 2% of the baseline for perplexity and loss (no closed form)."""
    if metric in ("accuracy", "f1"):
        return 2 * standard_error(baseline, rows)
    return 0.02 * abs(baseline)


def _outputs(model, batch):
    out = model(**batch)
    return out


@torch.no_grad()
def evaluate(model, batches: Iterable[dict], metric: str) -> float:
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is unknown; allowed: {', '.join(METRICS)}")
    preds, labels, loss_sum, weight = [], [], 0.0, 0
    for batch in batches:
        out = _outputs(model, batch)
        if metric in ("accuracy", "f1"):
            preds.append(out.logits.argmax(-1).flatten().cpu())
            labels.append(batch["labels"].flatten().cpu())
        else:
            n = int((batch["labels"] != -100).sum()) if "labels" in batch else 1
            loss_sum += float(out.loss) * n
            weight += n
    if metric in ("perplexity", "loss"):
        mean = loss_sum / max(1, weight)
        return math.exp(min(mean, 700.0)) if metric == "perplexity" else mean
    p, y = torch.cat(preds), torch.cat(labels)
    if metric == "accuracy":
        return float((p == y).double().mean())
    classes = sorted(set(y.tolist()) | set(p.tolist()))
    scores = []
    for c in (classes if len(classes) > 2 else [max(classes)]):
        tp = int(((p == c) & (y == c)).sum())
        fp = int(((p == c) & (y != c)).sum())
        fn = int(((p != c) & (y == c)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / len(scores)
