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

Sharding (:mod:`prune_callbacks.sharding`): ``params`` are the tensors the step sees, this
rank's rows of an FSDP2 parameter (the whole tensor otherwise); masks and saliency buffers are
sized from them; ``layout`` says where those rows sit in the whole tensor and which reducer
sums across ranks. ``counts()`` are this rank's; the group sums them.

Conventions: masks are bool tensors, ``True`` = pruned; selection is monotone
(a pruned position stays pruned) and exact in count; ``counts()`` reports, per
target, how many *weights* are pruned, which is what the one sparsity report
(:func:`prune_callbacks.report.build_report`) is built from.
"""

from __future__ import annotations

from typing import ClassVar, Optional, Sequence

import torch

from ..sharding import ShardLayout, layout_of, local, local_grad
from ..targets import Target


class Granularity:
    name: ClassVar[str] = "base"
    #: masks are weight-shaped, one per target: two such groups may not share a weight
    elementwise: ClassVar[bool] = True
    #: PruningConfig fields only this granularity reads; setting them for another one is an error
    config_fields: ClassVar[frozenset] = frozenset()
    #: whether it can select from FSDP2 row shards (see :mod:`prune_callbacks.sharding`)
    supports_sharding: ClassVar[bool] = True

    def __init__(self, config, targets: Sequence[Target], model: Optional[torch.nn.Module] = None, *args: str):
        self.config = config
        self.targets = list(targets)
        self.model = model
        self.check_targets()
        self.params = [t.param for t in self.targets]
        self.masks: list[torch.Tensor] = [torch.zeros(p.shape, dtype=torch.bool, device=p.device) for p in self.params]

    # ---------------------------------------------------------- the tensors the step sees
    @property
    def params(self) -> list[torch.Tensor]:
        """The tracked tensors as this rank holds them (local rows of a sharded parameter), fresh on every
        access so a parameter whose storage FSDP swapped is never written through a stale view."""
        return [local(p) for p in self.sources]

    @params.setter
    def params(self, value: Sequence[torch.Tensor]) -> None:
        self.sources: list[torch.Tensor] = list(value)  # the parameters themselves (DTensors when sharded)
        self._layout: Optional[ShardLayout] = None

    @property
    def layout(self) -> ShardLayout:
        """Global numels, local offsets and the reducer of ``params`` (:class:`~prune_callbacks.sharding.ShardLayout`)."""
        if self._layout is None:
            self._layout = layout_of(self.sources)
        return self._layout

    def grads(self) -> list[torch.Tensor]:
        """This step's gradients of ``params`` (local rows; zeros where there is none)."""
        out = []
        for source, view in zip(self.sources, self.params):
            grad = local_grad(source)
            out.append(grad if grad is not None else torch.zeros_like(view))
        return out

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

    def report(self) -> dict:
        """Granularity-specific figures for `Pruner.report` (structured units: units kept per layer)."""
        return {}

    def counts(self, measured: bool = False) -> list[tuple[str, int, int]]:
        """Per target ``(name, numel, pruned weights)``; ``measured`` counts exact zeros in the weights instead."""
        if measured:
            return [(t.name, p.numel(), p.numel() - int(torch.count_nonzero(p))) for t, p in zip(self.targets, self.params)]
        return [(t.name, m.numel(), int(torch.count_nonzero(m))) for t, m in zip(self.targets, self.masks)]
