"""Sparsity reports: from a running pruner's masks, or from any model / state dict.

`zero_count` is the one zero counter of every sparsity figure (reports, measured counts after
finalize, L1's zero fraction): an element is zero when it *equals* zero, so ``-0.0`` counts. The
compressed checkpoint (:mod:`prune_callbacks.export.sparse_io.format`) stores by *bit pattern* instead,
on purpose, so that ``-0.0`` and NaN payloads survive a round trip bitwise; the two agree on every
pruned weight, since the pruner writes ``+0.0``.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch

from prune_callbacks.core.targets import group_name  # noqa: F401 (re-exported: the one parser of block indices is in targets)


def zero_count(tensor: torch.Tensor) -> int:
    """Elements equal to zero (``+0.0`` and ``-0.0`` alike): the one zero counter (see the module docstring)."""
    return tensor.numel() - int(torch.count_nonzero(tensor))


def build_report(
    rows: Sequence[tuple[str, int, int]],
    step: int,
    mask_sparsity: float,
    scheduled_sparsity: float,
    extra: Optional[dict] = None,
) -> dict:
    """The one sparsity report. ``rows`` are ``(target name, numel, pruned weights)``.

    Three quantities that are easy to confuse, named apart:

    * ``scheduled_sparsity``: the schedule's value at this step (where the run is heading now);
    * ``mask_sparsity``: the sparsity the current masks were computed for (last mask update);
    * ``global_sparsity``: the measured fraction of the targeted weights that are pruned.
    """
    per_target = {
        n: {"numel": numel, "pruned": c, "nonzero": numel - c, "sparsity": c / numel if numel else 0.0}
        for n, numel, c in rows
    }
    total = sum(numel for _, numel, _ in rows)
    total_pruned = sum(c for _, _, c in rows)
    return {
        "step": step,
        "scheduled_sparsity": scheduled_sparsity,
        "mask_sparsity": mask_sparsity,
        "global_sparsity": total_pruned / total if total else 0.0,
        "prunable_params": total,
        "pruned_params": total_pruned,
        "nonzero_params": total - total_pruned,
        "per_target": per_target,
        "per_group": group_summary(per_target),
        **(extra or {}),
    }


def group_summary(per_target: Mapping[str, Mapping[str, float]]) -> dict:
    """Aggregate per-target counts over repeated blocks: one entry per layer kind."""
    groups: dict[str, list[int]] = {}
    for name, row in per_target.items():
        acc = groups.setdefault(group_name(name), [0, 0])
        acc[0] += int(row["numel"])
        acc[1] += int(row["numel"] - row["nonzero"])
    return {g: {"numel": n, "sparsity": p / n if n else 0.0} for g, (n, p) in groups.items()}


def sparsity_of_tensors(tensors: Mapping[str, torch.Tensor], min_dims: int = 2) -> dict:
    """Sparsity table of a state dict: every floating tensor with >= ``min_dims`` dims, plus totals.

    ``-0.0`` counts as zero. Used for saved models and checkpoints.
    """
    per_tensor = {}
    total = zeros = all_params = all_zeros = 0
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            continue
        n = tensor.numel()
        z = zero_count(tensor)
        all_params += n
        all_zeros += z
        if tensor.dim() >= min_dims:
            per_tensor[name] = {"numel": n, "nonzero": n - z, "sparsity": z / n if n else 0.0}
            total += n
            zeros += z
    return {
        "per_tensor": per_tensor,
        "matrix_params": total,
        "matrix_sparsity": zeros / total if total else 0.0,
        "params": all_params,
        "nonzero_params": all_params - all_zeros,
        "sparsity": all_zeros / all_params if all_params else 0.0,
    }


def model_sparsity(model: torch.nn.Module) -> dict:
    """`sparsity_of_tensors` over a model's parameters (tied parameters counted once)."""
    return sparsity_of_tensors(dict(model.named_parameters()))
