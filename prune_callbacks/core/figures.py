"""The log-key schema: every figure the adapters log, named once.

Both the Trainer callbacks and the Accelerate hook log exactly these keys (the
Trainer's reporters add their own ``train/`` prefix):

=============================  ==============================================================
``sparsity/global``            measured: fraction of the targeted weights that are pruned now
``sparsity/scheduled``         the schedule's value at this optimizer step
``sparsity/masks_target``      the sparsity the current masks were computed for (it lags
                               ``sparsity/scheduled`` between mask updates)
``sparsity/<layer kind>``      measured, per kind of layer over the repeated blocks
                               (``attention.self.query``, ``mlp.up_proj``, ...)
``pruning/mask_updates``       mask updates so far
``pruning/skipped_steps``      optimizer steps skipped for non-finite gradients
``pruning/lr_factor``          the multiple of the optimizer's rate at this step (``recovery_lr_scale``
                               runs only; the rate the Trainer logs is its scheduler's, without it)
``l1/strength``                current lambda of the proximal L1 step (L1 runs only)
``l1/zero_fraction``           exact zeros among the targeted weights (L1 runs only)
``guard/sparsity``             accuracy guard: sparsity of its latest decision (guarded runs only)
``guard/metric``               accuracy guard: the metric that decision was taken on
``guard/decision``             accuracy guard: the decision, as ``GUARD_DECISION_CODES``
``distill/kd_loss``            distillation: mean KD term since the last log (distilled runs only)
``distill/task_loss``          distillation: mean task loss since the last log
``distill/hidden_loss``        distillation: mean hidden-state term (``hidden_weight`` > 0)
=============================  ==============================================================

The ``distill/*`` keys are logged by the distillation adapters (`DISTILL_KEYS`); `is_figure_key`
covers the pruning figures (`PREFIXES`).

The three sparsities come from `Pruner.report()` (``global_sparsity``,
``scheduled_sparsity``, ``mask_sparsity``); nothing here counts them again.
Pure torch: no transformers / accelerate import.
"""

from __future__ import annotations

from typing import Any, Mapping

GLOBAL = "sparsity/global"
SCHEDULED = "sparsity/scheduled"
MASKS_TARGET = "sparsity/masks_target"
MASK_UPDATES = "pruning/mask_updates"
SKIPPED_STEPS = "pruning/skipped_steps"
LR_FACTOR = "pruning/lr_factor"
L1_STRENGTH = "l1/strength"
L1_ZERO_FRACTION = "l1/zero_fraction"
GUARD_SPARSITY = "guard/sparsity"
GUARD_METRIC = "guard/metric"
GUARD_DECISION = "guard/decision"
#: ``guard/decision`` is logged as a number (reporters take scalars)
GUARD_DECISION_CODES = {"baseline": -1, "continue": 0, "hold": 1, "rollback": 2, "stop": 3, "final": 4}

DISTILL_PREFIX = "distill/"
#: the distillation figures, in logging order (`distill_key` of the Distiller's term names)
DISTILL_KEYS = ("distill/kd_loss", "distill/task_loss", "distill/hidden_loss")


def distill_key(term: str) -> str:
    """``kd_loss`` -> ``distill/kd_loss`` (one of `DISTILL_KEYS`)."""
    key = DISTILL_PREFIX + term
    if key not in DISTILL_KEYS:
        raise KeyError(f"{key!r} is not a distillation figure of the log-key schema ({', '.join(DISTILL_KEYS)})")
    return key


#: Every pruning key of this schema starts with one of these.
PREFIXES = ("sparsity/", "pruning/", "l1/", "guard/")


def is_figure_key(key: str) -> bool:
    """Whether ``key`` belongs to this schema (what the adapters add to logs)."""
    return isinstance(key, str) and key.startswith(PREFIXES)


def mask_sparsity_of(report: Mapping[str, Any]) -> float:
    """The sparsity the current masks were computed for (``mask_sparsity`` of a report or a state dict)."""
    return float(report.get("mask_sparsity", 0.0))


def sparsity_figures(report: Mapping[str, Any], *, per_group: bool = True) -> dict:
    """The ``sparsity/*`` and ``pruning/*`` figures of a `Pruner.report()`."""
    out = {
        GLOBAL: float(report["global_sparsity"]),
        SCHEDULED: float(report["scheduled_sparsity"]),
        MASKS_TARGET: mask_sparsity_of(report),
        MASK_UPDATES: int(report.get("mask_updates", 0)),
        SKIPPED_STEPS: int(report.get("skipped_steps", 0)),
    }
    if "lr_factor" in report:  # recovery_lr_scale runs only
        out[LR_FACTOR] = float(report["lr_factor"])
    if per_group:
        for name, row in short_group_names(report.get("per_group", {})).items():
            key = f"sparsity/{name}"
            if key not in out:  # a layer kind called "global" would not overwrite the total
                out[key] = float(row["sparsity"])
    return out


def l1_figures(report: Mapping[str, Any]) -> dict:
    """``l1/strength`` and ``l1/zero_fraction`` of a `Pruner.report()` (empty when it runs no L1)."""
    l1 = report.get("l1")
    if not l1:
        return {}
    return {L1_STRENGTH: float(l1["strength"]), L1_ZERO_FRACTION: float(l1["zero_fraction"])}


def short_group_names(per_group: Mapping[str, Any]) -> dict:
    """``bert.encoder.layer.*.attention.self.query`` -> ``attention.self.query`` (full name on clashes)."""
    short = {g: g.rsplit(".*.", 1)[-1] for g in per_group}
    counts: dict[str, int] = {}
    for s in short.values():
        counts[s] = counts.get(s, 0) + 1
    return {(short[g] if counts[short[g]] == 1 else g): row for g, row in per_group.items()}
