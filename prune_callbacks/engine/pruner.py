"""`Pruner`: prunes a model while any optimizer trains it.

The pruner is a list of step components (:mod:`prune_callbacks.methods.steps`) run around
every *real* optimizer step, in the order documented in
:mod:`prune_callbacks.methods.steps.base`:

1. ``before_optimizer_step``: every component reads the accumulated, unscaled
   gradient (a pruning group's theta * grad for its saliency); a step with
   non-finite gradients is marked skipped and changes nothing;
2. the optimizer steps;
3. ``after_optimizer_step``: the step counter advances, then the proximal L1
   step, controllers, and mask updates when a group's schedule says so; last,
   masks are applied in place so pruned weights are exactly zero whatever the
   optimizer did.

One `PruningConfig` makes one pruning group; ``Pruner(model, [config_a, config_b])``
prunes different targets with different settings (two element-wise groups may
not share a weight). An `L1Config` adds the L1 step alone.

``attach(optimizer)`` registers both as step hooks on the *torch* optimizer
(unwrapping Accelerate's ``AcceleratedOptimizer``), so they fire only on real
steps: not on gradient-accumulation micro-steps, and not on steps a
``GradScaler`` skips; a ``GradScaler`` has unscaled the gradients by then.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Optional

import torch
from torch import nn

from prune_callbacks.core.config import L1Config, PruningConfig, PruningConfigError, make_configs
from prune_callbacks.core.config_errors import BLOCKS_WITHOUT_SLIM
from prune_callbacks.core.optimizer_unwrap import torch_optimizer as _torch_optimizer  # also imported from here by the Accelerate hooks
from prune_callbacks.engine.state import STATE_VERSION, load_pruner_state, pruner_state_dict  # noqa: F401 (STATE_VERSION: re-exported)
from prune_callbacks.core.report import build_report
from prune_callbacks.methods.steps.base import PHASES, StepComponent
from prune_callbacks.methods.steps.l1 import L1Component
from prune_callbacks.methods.steps.pruning import PruningGroup
from prune_callbacks.methods.steps.recovery import RecoveryRate
from prune_callbacks.methods.sharding import layout_of
from prune_callbacks.core.targets import (  # _preview: the one "a, b, ..." list
    _preview, check_not_sharded, drop_frozen, find_targets, frozen, unwrap_model,
)

logger = logging.getLogger(__name__)


class Pruner:
    """Gradual pruning engine. See the module docstring for the per-step order."""

    def __init__(self, model: nn.Module, config: Any = None, *, total_steps: Optional[int] = None, **overrides):
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"Pruner(model, ...) needs the torch.nn.Module to prune, got {type(model).__name__} {model!r:.60}; "
                "load it first (e.g. AutoModel...from_pretrained(name))"
            )
        self.configs = make_configs(config, **overrides)
        self.model = unwrap_model(model)
        self.total_steps = total_steps
        self.groups = [PruningGroup(self.model, c, total_steps) for c in self.configs if isinstance(c, PruningConfig)]
        self._layout = layout_of([p for g in self.groups for p in g.granularity.sources])  # agreement across ranks
        self._check_overlap()
        l1 = []
        for c in self.configs:
            if isinstance(c, L1Config):
                targets = drop_frozen(find_targets(self.model, c.include, c.exclude), "L1")
                check_not_sharded(targets)
                l1.append(L1Component(targets, c.l1_lambda, c.resolve_ramp, total_steps))
        for g in self.groups:
            if g.config.l1_lambda > 0:  # the group's own resolved ramp (resolved with its schedule)
                l1.append(L1Component(g.targets, g.config.l1_lambda, lambda _total, g=g: g.steps.l1_ramp_steps))
        self.l1 = l1
        self.recovery = [RecoveryRate(g, total_steps) for g in self.groups if g.config.recovery_lr_scale != 1.0]
        self.components: list[StepComponent] = []
        for component in [*l1, *self.groups, *self.recovery]:
            self.add_component(component)
        self.step = 0  # completed real optimizer steps
        self.skipped_steps = 0  # steps whose gradients were not finite
        self.finalized = False
        self._skip_pending = False
        self._optimizer: Optional[torch.optim.Optimizer] = None
        self._hooks: list = []
        self._saved_lr: Optional[list] = None  # the rates a component's lr_factor scaled for this step

    def add_component(self, component: StepComponent) -> None:
        """Add a step component (a controller, say); it runs in its phase's place (see :mod:`.steps.base`)."""
        if component.phase not in PHASES:
            raise ValueError(f"component phase {component.phase!r} is unknown; valid: {', '.join(PHASES)}")
        self.components.append(component)
        self.components.sort(key=lambda c: PHASES.index(c.phase))  # stable: list order within a phase

    def _check_overlap(self) -> None:
        """Two groups targeting the same weight: refused unless `Granularity.may_share` allows the pair."""
        owners: dict[int, list[int]] = {}
        clashes, why = [], {}
        for i, group in enumerate(self.groups):
            for t in group.targets:
                for j in owners.get(id(t.param), []):
                    reason = group.granularity.may_share(self.groups[j].granularity, group.granularity)
                    if reason:
                        clashes.append(f"{t.param_name} (configs {j} and {i})")
                        why.setdefault(reason, (self.groups[j].config.granularity, group.config.granularity))
                owners.setdefault(id(t.param), []).append(i)
        if clashes:
            reasons = "; ".join(f"{a!r} and {b!r}: {r}" for r, (a, b) in why.items())
            lead = ("two element-wise configs target the same weights, so each would undo the other's masks"
                    if all(g.granularity.weight_access == "elements" for g in self.groups) else
                    f"two configs target the same weights ({reasons})")
            raise PruningConfigError(f"{lead}: {_preview(clashes, 6)}. Split them with include/exclude")

    # ------------------------------------------------------------ one-group views (the common case)
    @property
    def config(self):
        """The first `PruningConfig` (or the only config)."""
        return self.groups[0].config if self.groups else self.configs[0]

    @property
    def steps(self):
        return self.groups[0].steps if self.groups else None

    @property
    def saliency(self):
        return self.groups[0].saliency if self.groups else None

    @property
    def schedule(self):
        """The first group's `~prune_callbacks.methods.schedule.Schedule`."""
        return self.groups[0].schedule if self.groups else None

    @property
    def targets(self):
        if not self.groups:
            return [t for c in self.l1 for t in c.targets]
        return [t for g in self.groups for t in g.targets]

    @property
    def params(self) -> list[torch.Tensor]:
        if not self.groups:
            return [p for c in self.l1 for p in c.params]
        return [p for g in self.groups for p in g.params]

    @property
    def pruned(self) -> list[torch.Tensor]:
        """Every group's masks (``True`` = pruned), in target order for element-wise granularities."""
        return [m for g in self.groups for m in g.masks]

    @property
    def mask_sparsity(self) -> float:
        """The sparsity the current masks were computed for (numel-weighted over groups)."""
        return self._weighted(lambda g: g.mask_sparsity)

    @property
    def sharded(self) -> bool:
        """Whether the targets are FSDP2 shards (each rank holds rows of every weight): `report`, `finalize`
        and the mask updates are then collective, to be called on every rank."""
        return bool(self._layout.sharded)

    @property
    def mask_updates(self) -> int:
        return max((g.mask_updates for g in self.groups), default=0)

    def _weighted(self, value) -> float:
        sizes = [g.numel for g in self.groups]
        total = sum(sizes)
        return sum(value(g) * s for g, s in zip(self.groups, sizes)) / total if total else 0.0

    # ------------------------------------------------------------ wiring
    def attach(self, optimizer: Any) -> "Pruner":
        """Run the pruner on every real step of ``optimizer``; returns self."""
        if self.finalized:
            raise RuntimeError("this Pruner was finalized; create a new one to prune again")
        self.detach()
        inner = _torch_optimizer(optimizer)
        now_frozen = [t.param_name for g in self.groups if g.saliency.needs_gradients for t in frozen(g.targets)]
        if now_frozen:
            raise ValueError(
                f"{len(now_frozen)} targeted weights were frozen (requires_grad=False) after this Pruner was built: "
                f"{_preview(now_frozen, 5)}; no gradient can score them, so they would be pruned first. Freeze "
                "weights before building the Pruner (frozen weights are then not targets)"
            )
        in_optimizer = {id(p) for group in inner.param_groups for p in group["params"]}
        missing = [t.param_name for t in self.targets if id(t.param) not in in_optimizer]
        if missing:
            raise ValueError(
                f"{len(missing)} targeted weights are not trained by this optimizer (frozen, or the optimizer was "
                f"built for another model): {_preview(missing, 5)}"
            )
        self._optimizer = inner
        self._hooks = [
            inner.register_step_pre_hook(lambda opt, args, kwargs: self._pre_step_hook(opt)),
            inner.register_step_post_hook(lambda opt, args, kwargs: self._post_step_hook(opt)),
        ]
        return self

    def _pre_step_hook(self, optimizer: torch.optim.Optimizer) -> None:
        # A GradScaler does not unscale for optimizers that unscale inside their own step (fused
        # Adam/AdamW/SGD: ``_step_supports_amp_scaling``) unless ``unscale_`` ran (grad clipping): it sets
        # ``grad_scale`` (None once unscaled) and ``found_inf`` on the optimizer and calls ``step()`` even
        # for an overflowing step, which the fused kernel then skips. Unscale, or skip, accordingly.
        found_inf = getattr(optimizer, "found_inf", None)
        if found_inf is not None and bool(found_inf):
            self._skip_pending = not self.finalized
            return
        scale = getattr(optimizer, "grad_scale", None)
        self.before_optimizer_step(grad_scale=None if scale is None else float(scale))
        if not self._skip_pending:
            self._scale_lr(optimizer)

    def _post_step_hook(self, optimizer: torch.optim.Optimizer) -> None:
        try:
            self.after_optimizer_step(optimizer)
        finally:
            self._restore_lr(optimizer)

    def _scale_lr(self, optimizer: torch.optim.Optimizer) -> None:
        """Multiply every param group's rate by the components' `lr_factor` for the coming step (put back by
        `_restore_lr` after it, so the run's scheduler never sees it)."""
        factor = self.lr_factor(self.step + 1)
        if factor != 1.0:
            self._saved_lr = [group["lr"] for group in optimizer.param_groups]
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * factor

    def lr_factor(self, step: Optional[int] = None) -> float:
        """The multiple of the optimizer's rate the components apply at optimizer step ``step`` (1-based; default:
        the last completed step): the product of their `StepComponent.lr_factor`, 1.0 unless ``recovery_lr_scale``."""
        step = self.step if step is None else step
        return math.prod(c.lr_factor(step) for c in self.components)

    def _restore_lr(self, optimizer: torch.optim.Optimizer) -> None:
        if self._saved_lr is not None:
            for group, lr in zip(optimizer.param_groups, self._saved_lr):
                group["lr"] = lr
            self._saved_lr = None

    def detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def set_total_steps(self, total_steps: int) -> None:
        """Resolve fractional steps for a run of ``total_steps`` optimizer steps (validates the config)."""
        for group in self.groups:
            group.resolve(total_steps)
        for component in [*self.l1, *self.recovery]:  # after the groups: both read a group's resolved schedule
            component.resolve(total_steps)
        self.total_steps = total_steps

    def first_update_step(self) -> Optional[int]:
        """The optimizer step (1-based) after which the first masks are computed (None: no pruning group)."""
        return min((g.schedule.first_update_step() for g in self.groups), default=None)

    def unit_rounding(self) -> list[str]:
        """What each group's ``final_sparsity`` becomes in whole units (structured granularities), for
        ``validate`` and logs: ``["granularity='blocks': final_sparsity 0.99 -> 5 of 6 blocks"]``."""
        return [f"granularity={g.config.granularity!r}: {g.rounding}" for g in self.groups if g.rounding]

    def schedule_advice(self) -> list[str]:
        """Each group's warning about when its pruning ends (`Granularity.schedule_advice`), for ``validate``."""
        return [g.advice for g in self.groups if g.advice]

    def last_dense_step(self) -> Optional[int]:
        """The optimizer step after which the model is last dense: one before `first_update_step` (0: before any
        step), None when nothing is ever pruned. The one source of "the step before the first mask update"
        (dense baselines, a ``"before_pruning"`` teacher snapshot)."""
        first = self.first_update_step()
        return None if first is None else max(0, first - 1)

    # ------------------------------------------------------------ per step
    @torch.no_grad()
    def before_optimizer_step(self, grad_scale: Optional[float] = None) -> None:
        """Fold this step's gradients into the saliency. Pass ``grad_scale`` if grads are still loss-scaled."""
        if self.finalized:
            return
        if self.recovery and self._optimizer is None:
            raise RuntimeError("recovery_lr_scale changes the optimizer's learning rate on each step, which needs "
                               "pruner.attach(optimizer) (the Trainer and Accelerate adapters attach)")
        finite = [c.prepare(grad_scale) for c in self.components]
        self._skip_pending = not self._layout.all_true(all(finite))  # the same on every rank of a sharded model
        for c in self.components:
            c.discard() if self._skip_pending else c.commit()

    @torch.no_grad()
    def after_optimizer_step(self, optimizer: Any = None) -> None:
        """Advance one step: L1, controllers, mask updates when scheduled, masks applied."""
        if self.finalized:
            return
        if self._skip_pending:
            self._skip_pending = False
            self.skipped_steps += 1
            self.apply_masks()
            return
        self.step += 1
        source = optimizer if optimizer is not None else self._optimizer
        inner = _torch_optimizer(source) if source is not None else None
        for component in self.components:
            component.after_step(self.step, inner)
        self.apply_masks()

    def scheduled_sparsity(self, step: Optional[int] = None) -> float:
        """The schedules' value at ``step`` (default: now), numel-weighted over groups."""
        return self._weighted(lambda g: g.schedule.value(self.step if step is None else step))

    @torch.no_grad()
    def update_masks(self, sparsity: float) -> None:
        """Recompute every group's masks for ``sparsity`` (never below its current masks) and apply them."""
        for group in self.groups:
            group.update(sparsity)

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Write +0.0 into every pruned position (``masked_fill_``, so no -0.0 is left)."""
        for component in self.components:
            component.apply()

    # ------------------------------------------------------------ results
    def report(self) -> dict:
        """Sparsity report (see :func:`prune_callbacks.core.report.build_report` for the three sparsity figures).

        After `finalize` the pruner is detached: the counts are then *measured* from the
        weights (exact zeros), so training on after finalize shows up as lower sparsity,
        and ``finalized`` is True.
        """
        rows = [row for g in self.groups for row in g.counts(measured=self.finalized)]  # global (sharded: collective)
        extra = {
            "skipped_steps": self.skipped_steps,
            "mask_updates": self.mask_updates,
            "model_params": sum(p.numel() for p in self.model.parameters()),
            "finalized": self.finalized,
            "groups": [
                {"granularity": g.config.granularity, "saliency": g.config.saliency, "targets": len(g.targets),
                 "scheduled_sparsity": g.schedule.value(self.step), "mask_sparsity": g.mask_sparsity,
                 "update_every": g.steps.update_every, "bytes_this_rank": g.local_bytes(), **g.granularity.report(),
                 **g.report()}
                for g in self.groups
            ],
        }
        if self.recovery and not self.finalized:
            extra["lr_factor"] = self.lr_factor()
        if self.l1:
            l1 = [c.report() for c in self.l1]
            extra["l1"] = {"strength": max(r["strength"] for r in l1) if not self.finalized else 0.0,
                           "zero_fraction": l1[0]["zero_fraction"] if len(l1) == 1 else
                           sum(r["zero_fraction"] for r in l1) / len(l1)}
        return build_report(rows, step=self.step, mask_sparsity=self.mask_sparsity,
                            scheduled_sparsity=self.scheduled_sparsity(), extra=extra)

    @torch.no_grad()
    def finalize(self, *, slim: Optional[bool] = None) -> None:
        """Make the masks permanent: pruned weights are +0.0, the pruner detaches and frees its buffers.

        Parameters stay the same objects (an optimizer over them stays valid) and
        state-dict keys are unchanged. Calling it again does nothing. The pruner no
        longer acts afterwards: training on would change pruned weights, and
        `report` then measures that.

        Nothing silently wrong (each as ``warnings.warn`` and a WARNING log line):

        * the masks are below a group's ``final_sparsity``: the message says why (optimizer steps
          skipped for non-finite gradients, a run stopped before ``end_step``, no mask update);
          a guarded group's target is an upper bound, so it is named only for skipped steps or a
          shortened run. Rounding to whole units (blocks, neurons) is announced when the Pruner
          is built and logged here at INFO, not warned;
        * removed blocks (``granularity='blocks'``) are only skipped by a forward hook, which a
          saved model does not keep (`~prune_callbacks.core.config_errors.BLOCKS_WITHOUT_SLIM`).
          ``slim``: True (the caller slims next, as ``slim_pruned`` does) is quiet; False (the
          model is saved as it is) refuses with `PruningConfigError` before anything is made
          permanent; None (unknown: the Trainer callbacks finalize before they slim) warns when the
          model's ``state_dict`` is taken (``save_pretrained``, ``save_sparse``) while removed blocks
          are still in it, i.e. exactly when an unslimmed model is saved.
        """
        if self.finalized:
            return
        unslimmed = [g.config.granularity for g in self.groups if g.granularity.needs_slim_to_save()]
        if unslimmed and slim is False:
            raise PruningConfigError(BLOCKS_WITHOUT_SLIM, [("granularity", BLOCKS_WITHOUT_SLIM)])
        shortfall = self._shortfall()
        self.detach()
        for component in self.components:
            component.finalize()
        self.finalized = True
        for message in shortfall:
            logger.warning("prune_callbacks: %s", message)
            warnings.warn(message, stacklevel=3)
        self._log_rounding()
        if unslimmed and slim is None:  # slimmed next, or saved as it is: the save says which
            logger.info("prune_callbacks: removed blocks are skipped by forward hooks; slim the model before saving")
            self.model.register_state_dict_post_hook(lambda *args: self._warn_unslimmed_save())

    def _warn_unslimmed_save(self) -> None:
        """State-dict hook of a finalized model with removed, unslimmed blocks: saving it loses the skip hooks."""
        if any(g.granularity.needs_slim_to_save() for g in self.groups):
            logger.warning("prune_callbacks: %s", BLOCKS_WITHOUT_SLIM)
            warnings.warn(BLOCKS_WITHOUT_SLIM, stacklevel=2)

    def _shortfall(self) -> list[str]:
        """Why a group's masks end below its ``final_sparsity`` (empty when every schedule got there)."""
        messages = []
        for i, g in enumerate(self.groups):
            final, reached, end = g.schedule.final, g.mask_sparsity, g.schedule.end
            if reached >= final or math.isclose(reached, final, abs_tol=1e-9):
                continue
            stopped = self.step < end
            if g.config.accuracy_guard is not None and not (stopped or self.skipped_steps):
                continue  # the guard lowered the target on purpose; it reports its own verdict
            reasons = []
            if self.skipped_steps:
                reasons.append(
                    f"{self.skipped_steps} of {self.step + self.skipped_steps} optimizer steps were skipped for "
                    "non-finite gradients (a NaN/inf weight or gradient, or fp16 weights under AdamW overflowing), "
                    "and skipped steps do not advance the schedule")
            if stopped:
                reasons.append(f"the run stopped at optimizer step {self.step} before end_step={end}")
            if g.mask_updates == 0:
                reasons.append("no mask update ran")
            where = f"config {i} ({g.config.granularity}): " if len(self.groups) > 1 else ""
            messages.append(f"{where}pruning finalized at sparsity {reached:.4f}, below final_sparsity={final:g}: "
                            f"{'; '.join(reasons) or 'the schedule did not reach its end'}")
        return messages

    def _log_rounding(self) -> None:
        for g in self.groups:
            numel = sum(n for _, n, _ in g.granularity.counts())
            pruned = sum(c for _, _, c in g.granularity.counts())
            if numel and g.mask_sparsity and pruned / numel < g.mask_sparsity - 1e-6:
                logger.info("prune_callbacks: %s pruned %.4f of its weights for final_sparsity=%g: rounded to whole "
                            "units", g.config.granularity, pruned / numel, g.mask_sparsity)

    # ------------------------------------------------------------ state (layout: :mod:`.pruner_state`)
    def state_dict(self) -> dict:
        """Masks, saliency buffers, schedules and counters; ``load_state_dict`` of it resumes exactly.

        The first group's masks and buffers are keyed by name (the original single-config layout);
        further groups' by ``group<i>/<name>``; per-group counters are in ``groups``.
        """
        return pruner_state_dict(self)

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict`. Refuses a state that cannot be resumed (other targets, saliency,
        granularity, number of configs); logs a warning for fields that merely changed."""
        load_pruner_state(self, state)
