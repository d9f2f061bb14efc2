"""A pruning group: one `PruningConfig`'s targets, saliency, granularity and schedule, as a step component.

Per real step it folds theta * grad into its saliency; after the step, when its
schedule says so, it asks its granularity for masks at the schedule's value and
applies them. Everything shape-specific is the granularity's (see
:mod:`prune_callbacks.granularity.base`); everything timing-specific is the
schedule's (:mod:`prune_callbacks.schedule`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..config import PruningConfig
from ..distributed import broadcast_masks
from ..registry import GRANULARITIES
from ..saliency import all_finite, gradient_products, make_saliency
from ..structured.merging import UnitMerger
from ..targets import check_not_sharded, find_targets
from .base import StepComponent


class NoInformationError(RuntimeError):
    """A mask update whose scores cannot tell weights apart (it would prune by position)."""


class PruningGroup(StepComponent):
    phase = "masks"
    name = "pruning"

    def __init__(self, model: nn.Module, config: PruningConfig, total_steps: Optional[int] = None):
        self.config = config
        self.targets = find_targets(model, config.include, config.exclude)
        check_not_sharded(self.targets)
        granularity, args = GRANULARITIES.resolve(config.granularity)
        self.granularity = granularity(config, self.targets, model, *args)
        self.saliency = make_saliency(
            config.saliency, self.granularity.params, beta=config.beta, uncertainty_beta=config.uncertainty_beta
        )
        self.schedule = None
        self.merger = None  # merge: removed FFN neurons folded into kept ones at each update (structured.merging)
        if config.merge is not None:
            self.merger = UnitMerger(model, self.granularity.groups, config.merge, self.granularity.family)
        self._next_step = 1
        self.resolve(total_steps)
        self.mask_sparsity = 0.0  # the sparsity the current masks were computed for
        self.mask_updates = 0
        self.folded = 0  # gradients folded into the saliency since the last mask update
        self._prods: Optional[list[torch.Tensor]] = None
        self._work: Optional[list[torch.Tensor]] = None  # reused theta*grad buffers (see saliency.py)

    def resolve(self, total_steps: Optional[int]) -> None:
        self.steps = self.config.resolve(total_steps)
        state = self.schedule.state_dict() if self.schedule is not None else None
        self.schedule = self.config.build_schedule(self.steps)
        if state:
            self.schedule.load_state_dict(state)
        if self.merger is not None:
            self.merger.watch(self._next_step, self.schedule)

    @property
    def params(self) -> list[torch.Tensor]:
        return self.granularity.params

    @property
    def masks(self) -> list[torch.Tensor]:
        return self.granularity.masks

    # ------------------------------------------------------------ around the step
    def prepare(self, grad_scale: Optional[float]) -> bool:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if not self.saliency.needs_gradients:
            return all_finite(grads)
        if self._work is None:
            self._work = [torch.empty(p.shape, dtype=torch.float32, device=p.device) for p in self.params]
        prods, finite = gradient_products(self.params, grads, grad_scale, out=self._work)
        self._prods = prods if finite else None
        return finite

    def commit(self) -> None:
        if self._prods is not None:
            self.saliency.update(self.params, self._prods)
            self.folded += 1
        self._prods = None

    def discard(self) -> None:
        self._prods = None

    def after_step(self, step: int, optimizer: Any) -> None:
        if self.schedule.is_update_step(step):
            self.update(self.schedule.value(step))
        self._next_step = step + 1
        if self.merger is not None:
            self.merger.watch(self._next_step, self.schedule)

    def apply(self) -> None:
        if self.mask_sparsity > 0.0:
            self.granularity.apply()

    # ------------------------------------------------------------ masks
    @torch.no_grad()
    def update(self, sparsity: float) -> None:
        """Recompute masks for ``sparsity`` (never below the current masks) and apply them."""
        sparsity = max(sparsity, self.mask_sparsity)
        if self.saliency.needs_gradients and self.folded == 0 and sparsity > self.mask_sparsity:
            raise NoInformationError(
                f"mask update to sparsity {sparsity:.4f} but no gradient reached the {self.config.saliency!r} saliency "
                f"since {'the last update' if self.mask_updates else 'the start'}: when driving the pruner by hand, "
                "call pruner.before_optimizer_step() after backward() and before optimizer.step() (or use "
                "pruner.attach(optimizer)); a oneshot schedule needs start_step >= 1 with gradients before it"
            )
        scores = self.saliency.scores(self.params)
        self._check_informative(scores, sparsity)
        masks = self.granularity.select(scores, sparsity)
        if self.config.sync_masks:
            broadcast_masks(masks)
        if self.merger is not None:  # before the new masks zero the removed neurons' output columns
            self.merger.fold(self.masks, masks)
        self.granularity.set_masks(masks)
        self.mask_sparsity = sparsity
        self.mask_updates += 1
        self.folded = 0
        self.apply()

    def _check_informative(self, scores, sparsity: float) -> None:
        """Refuse scores that are all equal over the weights still unpruned (zero saliency, say)."""
        if sparsity <= self.mask_sparsity:
            return
        lo, hi = float("inf"), float("-inf")
        for score, pruned in zip(scores, self.masks):
            live = score.detach()[~pruned] if pruned.shape == score.shape else score.detach().reshape(-1)
            if live.numel():
                lo, hi = min(lo, float(live.min())), max(hi, float(live.max()))
        if lo == hi:
            raise NoInformationError(
                f"every unpruned weight has the same {self.config.saliency!r} score ({lo:g}), so the mask update "
                "could only prune by position; the gradients reaching the pruner are zero or missing (frozen "
                "weights? before_optimizer_step() called after zero_grad()?)"
            )

    def report(self) -> dict:
        return self.merger.report() if self.merger is not None else {}

    # ------------------------------------------------------------ finalize
    def finalize(self) -> None:
        if self.merger is not None:
            self.merger.release()
        self.granularity.finalize()
        self.saliency.release()
        self._work = None
