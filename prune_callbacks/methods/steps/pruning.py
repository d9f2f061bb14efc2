"""A pruning group: one `PruningConfig`'s targets, saliency, granularity and schedule, as a step component.

Per real step it folds theta * grad into its saliency; after the step, when its
schedule says so, it asks its granularity for masks at the schedule's value and
applies them. Everything shape-specific is the granularity's (see
:mod:`prune_callbacks.methods.granularity.base`); everything timing-specific is the
schedule's (:mod:`prune_callbacks.methods.schedule`).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Optional

import torch
from torch import nn

from prune_callbacks.core.config import PruningConfig
from prune_callbacks.core.distributed import broadcast_masks
from prune_callbacks.core.registry import GRANULARITIES, SALIENCIES
from prune_callbacks.methods.saliency import all_finite, gradient_products, make_saliency
from prune_callbacks.methods.sharding import check_shardable, is_sharded, local_bytes
from prune_callbacks.methods.structured.mergers import make_merger
from prune_callbacks.core.targets import drop_frozen, find_targets
from prune_callbacks.methods.steps.base import StepComponent


logger = logging.getLogger(__name__)


class NoInformationError(RuntimeError):
    """A mask update whose scores cannot tell weights apart (it would prune by position)."""


class PruningGroup(StepComponent):
    phase = "masks"
    name = "pruning"

    def __init__(self, model: nn.Module, config: PruningConfig, total_steps: Optional[int] = None):
        self.config = config
        self.targets = find_targets(model, config.include, config.exclude)
        if SALIENCIES.get(config.saliency).needs_gradients:  # frozen weights would score zero: not targets
            self.targets = drop_frozen(self.targets)
        check_shardable([(t.param_name, t.param) for t in self.targets])
        granularity, args = GRANULARITIES.resolve(config.granularity)
        self._check_sharding(granularity)
        self.granularity = granularity(config, self.targets, model, *args)
        #: final_sparsity in whole units ("final_sparsity 0.99 -> 5 of 6 blocks"), None when exact; raises at 0 units
        self.rounding = self.granularity.describe_target(config.final_sparsity)
        if self.rounding:
            logger.info("prune_callbacks: granularity=%r: %s", config.granularity, self.rounding)
        self.saliency = make_saliency(  # a granularity may score with its own (low_rank: magnitude, no buffers)
            self.granularity.own_saliency or config.saliency, self.granularity.params, beta=config.beta,
            uncertainty_beta=config.uncertainty_beta, units=self.granularity,
        )
        self.schedule = None
        self.merger = None  # merge: removed units folded into kept ones at each update (structured.mergers)
        if config.merge is not None:
            self.merger = make_merger(model, self.granularity, config.merge)
        self._next_step = 1
        self.advice: Optional[str] = None  # the granularity's schedule_advice for the resolved run (warned once)
        self.resolve(total_steps)
        self.mask_sparsity = 0.0  # the sparsity the current masks were computed for
        self.mask_updates = 0
        self.folded = 0  # gradients folded into the saliency since the last mask update
        self._prods: Optional[list[torch.Tensor]] = None
        self._work: Optional[list[torch.Tensor]] = None  # reused theta*grad buffers (see saliency.py)
        #: per tracked tensor: whether a gradient (not None) ever reached it; see `_check_gradients_seen`
        self.received_grad = [False] * len(self.params)
        self._grads: Optional[tuple] = None  # this step's gradients, handed to the granularity at commit
        self.numel = sum(n for _, n, _ in self.counts())  # targeted weights over all ranks (fixed)

    def _check_sharding(self, granularity) -> None:
        """Refuse what is not built for FSDP2 shards yet, naming it (before any buffer is allocated)."""
        if not any(is_sharded(t.param) for t in self.targets):
            return
        if not granularity.supports_sharding:
            raise NotImplementedError(
                f"granularity={self.config.granularity!r} does not support FSDP2-sharded weights yet; "
                "use 'unstructured', 'N:M', 'ffn_neurons' or 'attention_heads', or prune without sharding"
            )
        if self.config.merge is not None:
            raise NotImplementedError(
                f"merge={self.config.merge!r} does not support FSDP2-sharded weights yet (it refits whole output "
                "projections); leave it unset"
            )
        if self.config.l1_lambda > 0:
            raise NotImplementedError(
                f"l1_lambda={self.config.l1_lambda!r} does not support FSDP2-sharded weights yet; set it to 0"
            )

    def resolve(self, total_steps: Optional[int]) -> None:
        self.steps = self.config.resolve(total_steps)
        state = self.schedule.state_dict() if self.schedule is not None else None
        self.schedule = self.config.build_schedule(self.steps)
        if state:
            self.schedule.load_state_dict(state)
        if self.merger is not None:
            self.merger.watch(self._next_step, self.schedule)
        last = getattr(self.schedule, "last_update_step", None)  # a user's registered schedule may not be a Schedule
        if total_steps and last is not None:
            advice = self.granularity.schedule_advice(last(), total_steps)
            if advice and advice != self.advice:
                logger.warning("prune_callbacks: %s", advice)
                warnings.warn(advice, stacklevel=3)
            self.advice = advice

    @property
    def params(self) -> list[torch.Tensor]:
        return self.granularity.params

    @property
    def masks(self) -> list[torch.Tensor]:
        return self.granularity.masks

    # ------------------------------------------------------------ around the step
    def prepare(self, grad_scale: Optional[float]) -> bool:
        self.granularity.prepare_step()  # e.g. N:M-srste puts its dense shadow weights back first
        grads = self.granularity.grads()  # local rows when sharded; zeros where there is none
        seen = self.received_grad
        if not all(seen):  # once every tensor got a gradient (the usual case from step 1) nothing is left to record
            for i, source in enumerate(self.granularity.sources):
                if not seen[i] and source.grad is not None:
                    seen[i] = True
        self._grads = (grads, grad_scale)  # for the granularity's own statistics, at commit
        if not self.saliency.needs_gradients:
            return all_finite(grads)
        if self._work is None:
            self._work = [torch.empty(p.shape, dtype=torch.float32, device=p.device) for p in self.params]
        prods, finite = gradient_products(self.params, grads, grad_scale, out=self._work)
        self._prods = prods if finite else None
        return finite

    def commit(self) -> None:
        if self._grads is not None:
            self.granularity.observe(*self._grads)
            self._grads = None
        if self._prods is not None:
            self.saliency.update(self.params, self._prods)
            self.folded += 1
        self._prods = None

    def discard(self) -> None:
        self._prods = None
        self._grads = None

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
        self._check_gradients_seen(sparsity)
        scores = self.saliency.scores(self.params)
        self._check_informative(scores, sparsity)
        if self.saliency.per_unit:  # one score per unit already (unit_taylor)
            masks = self.granularity.select_units(scores, sparsity)
        else:
            masks = self.granularity.select(scores, sparsity)
        if self.merger is not None:  # a merger may choose the units its fold keeps best (merge.select)
            masks = self.merger.choose(self.masks, masks)
        if self.config.sync_masks and not self.granularity.layout.sharded:  # shards differ per rank by design
            broadcast_masks(masks)
        if self.merger is not None:  # before the new masks zero the removed neurons' output columns
            self.merger.fold(self.masks, masks)
        self.granularity.set_masks(masks)
        self.mask_sparsity = sparsity
        self.mask_updates += 1
        self.folded = 0
        self.apply()

    def _check_gradients_seen(self, sparsity: float) -> None:
        """Refuse a mask update while some tracked tensors (not all) never received a gradient.

        Decision (issue 29): a weight that requires grad but whose ``.grad`` stayed None (a layer the forward
        never calls, a branch not taken so far) has no saliency information, and scoring it zero would prune
        it first. It is not guessed at: the update stops with the names and the fixes. (When *no* tensor got a
        gradient, `_check_informative` explains the hand-driven-loop mistakes instead.) Frozen weights are
        excluded when the Pruner is built (`~prune_callbacks.core.targets.drop_frozen`). After a resume, every
        tensor counts as seen: the saved saliency buffers carry the history.
        """
        if not self.saliency.needs_gradients or sparsity <= self.mask_sparsity or all(self.received_grad) \
                or not any(self.received_grad):
            return
        names = {id(p): n for n, p in self.granularity.model.named_parameters()} if self.granularity.model is not None else {}
        missing = [names.get(id(p), f"tensor {i}") for i, (p, seen) in enumerate(zip(self.granularity.sources, self.received_grad))
                   if not seen]
        raise NoInformationError(
            f"mask update to sparsity {sparsity:.4f}: {len(missing)} targeted weights never received a gradient "
            f"(their .grad stayed None), so the {self.config.saliency!r} saliency would rank them zero and prune them "
            f"first: {', '.join(missing[:8])}{', ...' if len(missing) > 8 else ''}. If the forward never uses them, "
            "exclude them (exclude=[...]) or freeze them (requires_grad_(False)) before building the Pruner"
        )

    def _check_informative(self, scores, sparsity: float) -> None:
        """Refuse scores that are all equal over the weights still unpruned (zero saliency, say)."""
        if sparsity <= self.mask_sparsity:
            return
        lo, hi = float("inf"), float("-inf")
        for score, pruned in zip(scores, self.masks):
            live = score.detach()[~pruned] if pruned.shape == score.shape else score.detach().reshape(-1)
            if live.numel():
                lo, hi = min(lo, float(live.min())), max(hi, float(live.max()))
        ranks = self.granularity.layout.gather_values([lo, hi])  # every rank decides alike (one tiny all-reduce)
        lo, hi = min(r[0] for r in ranks), max(r[1] for r in ranks)
        if lo == hi:
            raise NoInformationError(
                f"every unpruned weight has the same {self.config.saliency!r} score ({lo:g}), so the mask update "
                "could only prune by position; the gradients reaching the pruner are zero or missing (frozen "
                "weights? before_optimizer_step() called after zero_grad()?)"
            )

    # ------------------------------------------------------------ counts
    def counts(self, measured: bool = False) -> list[tuple[str, int, int]]:
        """The granularity's ``(name, numel, pruned)`` rows, summed over ranks when sharded (a collective)."""
        rows = self.granularity.counts(measured=measured)
        flat = self.granularity.layout.sum_counts([v for _, n, c in rows for v in (n, c)])
        return [(name, flat[2 * i], flat[2 * i + 1]) for i, (name, _, _) in enumerate(rows)]

    def local_bytes(self) -> int:
        """Bytes of pruning state this rank holds: masks, saliency buffers, the reused theta*grad buffer
        (FSDP2: the local shard's share; see :func:`prune_callbacks.methods.sharding.local_bytes`)."""
        buffers = [b for bufs in self.saliency.buffers.values() for b in bufs]
        return local_bytes([*self.masks, *buffers, *(self._work or [])])

    def report(self) -> dict:
        return self.merger.report() if self.merger is not None else {}

    # ------------------------------------------------------------ finalize
    def finalize(self) -> None:
        if self.merger is not None:
            self.merger.release()
        self.granularity.finalize()
        self.saliency.release()
        self._work = None
