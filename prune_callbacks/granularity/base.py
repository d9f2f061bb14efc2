"""The granularity seam: how one group's masks are shaped, selected, applied and finalized.

A `Granularity` is built for one `PruningConfig` and the targets it selected.
The engine (`Pruner`) never looks inside it; per mask update it only does::

    scores = saliency.scores(granularity.params)      # per-weight scores of the tracked tensors
    granularity.set_masks(granularity.select(scores, sparsity))
    granularity.apply()                               # and after every optimizer step

Implementations:

* ``unstructured`` (:mod:`.unstructured`): one mask per weight, global threshold
  with min/max caps or per-layer.
* ``N:M`` (:mod:`.nm`): N kept in every M consecutive weights along the input
  dimension.
* structured units (FFN neurons, attention heads, blocks) mask units that span
  several tensors: ``params`` are every tensor a unit spans, ``masks`` are one
  bool per unit, ``apply`` zeroes every spanned slice.

Conventions: masks are bool tensors, ``True`` = pruned (`MASKS_MEAN`); the one place
that speaks of *kept* units is the structured ``keep()`` that feeds slimming
(:func:`prune_callbacks.structured.slim.slim` takes ``True`` = kept, ``keep = ~pruned``);
selection is monotone
(a pruned position stays pruned) and exact in count; ``counts()`` reports, per
target, how many *weights* are pruned, which is what the one sparsity report
(:func:`prune_callbacks.report.build_report`) is built from.
"""

from __future__ import annotations

from typing import ClassVar, Optional, Sequence

import torch

from ..report import zero_count
from ..targets import Target


#: what ``True`` means in every granularity's ``masks`` (``keep()`` for slimming is their complement)
MASKS_MEAN = "pruned"


class Granularity:
    name: ClassVar[str] = "base"
    #: masks are weight-shaped, one per target: two such groups may not share a weight
    elementwise: ClassVar[bool] = True
    #: PruningConfig fields only this granularity reads; setting them for another one is an error
    config_fields: ClassVar[frozenset] = frozenset()

    def __init__(self, config, targets: Sequence[Target], model: Optional[torch.nn.Module] = None, *args: str):
        self.config = config
        self.targets = list(targets)
        self.model = model
        self.check_targets()
        self.params: list[torch.Tensor] = [t.param for t in self.targets]
        self.masks: list[torch.Tensor] = [torch.zeros(p.shape, dtype=torch.bool, device=p.device) for p in self.params]

    # ---------------------------------------------------------- config-time facts
    @classmethod
    def fixed_final_sparsity(cls, *args: str) -> Optional[float]:
        """The final sparsity this granularity implies (N:M: 1 - N/M), or None if the config chooses it."""
        return None

    @classmethod
    def final_sparsity_hint(cls, value, *args: str) -> Optional[str]:
        """A message for a ``final_sparsity`` this granularity reads differently (None: the generic range check)."""
        return None

    @classmethod
    def check_config(cls, config, *args: str) -> list[str]:
        """Problems with ``config`` for this granularity (each names the field, value and what is allowed)."""
        return []

    # ---------------------------------------------------------- per group
    def check_targets(self) -> None:
        """Raise ``ValueError`` listing every target this granularity cannot prune."""

    def describe_target(self, sparsity: float) -> Optional[str]:
        """What ``final_sparsity`` becomes in whole units (``"5 of 6 blocks"``), logged when the Pruner is built;
        raises `~prune_callbacks.config_errors.PruningConfigError` when it rounds to 0 units. None: exact."""
        return None

    @property
    def mask_names(self) -> list[str]:
        """State-dict keys of ``masks`` (target names for weight-shaped masks)."""
        return [t.name for t in self.targets]

    def select(self, scores: Sequence[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
        """New masks for ``sparsity``: a superset of ``self.masks`` (already-pruned positions stay pruned)."""
        raise NotImplementedError

    def set_masks(self, masks: Sequence[torch.Tensor]) -> None:
        for dst, src in zip(self.masks, masks):
            dst.copy_(src)

    @torch.no_grad()
    def apply(self) -> None:
        """Write +0.0 into every pruned position, after every optimizer step (the hot path).

        ``w += -1 * w * pruned`` in one fused ``_foreach_addcmul_`` over the bool masks viewed as
        uint8 (no copy): a pruned weight becomes ``w - w = +0.0`` exactly (never -0.0), a kept one
        ``w + (-0.0) = w``. On CPU this is ~10x faster than ``masked_fill_`` (measured 7 vs 78 ms
        over MiniLM's 10.6M targeted weights, one thread), with no extra memory.
        """
        torch._foreach_addcmul_(self.params, self.params, [m.view(torch.uint8) for m in self.masks], value=-1.0)

    @torch.no_grad()
    def finalize(self) -> None:
        """Make the masks permanent: ``masked_fill_`` (exact +0.0 even where a weight went non-finite)."""
        for param, pruned in zip(self.params, self.masks):
            param.masked_fill_(pruned, 0.0)

    def needs_slim_to_save(self) -> bool:
        """Whether the model, saved as it is, would compute something else than the masked one (removed blocks)."""
        return False

    def report(self) -> dict:
        """Granularity-specific figures for `Pruner.report` (structured units: units kept per layer)."""
        return {}

    def counts(self, measured: bool = False) -> list[tuple[str, int, int]]:
        """Per target ``(name, numel, pruned weights)``; ``measured`` counts exact zeros in the weights instead."""
        if measured:
            return [(t.name, t.numel, zero_count(t.param)) for t in self.targets]
        return [(t.name, m.numel(), int(torch.count_nonzero(m))) for t, m in zip(self.targets, self.masks)]
