"""`Pruner`: prunes a model while any optimizer trains it.

Per real optimizer step:

1. ``before_optimizer_step``: theta * grad from the accumulated, unscaled
   gradient feeds the saliency (a step with non-finite gradients is marked
   skipped and changes nothing);
2. the optimizer steps;
3. ``after_optimizer_step``: the step counter advances, the proximal L1 step
   runs, masks are recomputed when the schedule says so, and masks are applied
   in place so pruned weights are exactly zero whatever the optimizer did.

``attach(optimizer)`` registers both as step hooks on the *torch* optimizer
(unwrapping Accelerate's ``AcceleratedOptimizer``), so they fire only on real
steps: not on gradient-accumulation micro-steps, and not on steps a
``GradScaler`` skips; a ``GradScaler`` has unscaled the gradients by then.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .config import PruningConfig, make_config
from .distributed import broadcast_masks
from .regularization import apply_l1_proximal
from .report import build_report
from .saliency import all_finite, gradient_products, make_saliency
from .schedule import is_update_step, l1_strength, target_sparsity
from .selection import global_masks, per_layer_masks
from .targets import check_not_sharded, find_targets, unwrap_model

STATE_VERSION = 1


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The innermost ``torch.optim.Optimizer`` (Accelerate and others wrap it in ``.optimizer``)."""
    # AcceleratedOptimizer *subclasses* torch.optim.Optimizer (without calling its __init__),
    # so unwrap while ``.optimizer`` leads further in, not only while the type is foreign.
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer or not (isinstance(inner, torch.optim.Optimizer) or hasattr(inner, "optimizer")):
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"attach() needs a torch.optim.Optimizer (or a wrapper exposing .optimizer); got {type(optimizer).__name__}")
    return optimizer


class Pruner:
    """Gradual pruning engine. See the module docstring for the per-step order."""

    def __init__(self, model: nn.Module, config: "PruningConfig | dict | None" = None, *, total_steps: Optional[int] = None, **overrides):
        self.config = make_config(config, **overrides)
        self.model = unwrap_model(model)
        self.targets = find_targets(self.model, self.config.include, self.config.exclude)
        check_not_sharded(self.targets)
        self.total_steps = total_steps
        self.steps = self.config.resolve(total_steps)
        self.params = [t.param for t in self.targets]
        self.saliency = make_saliency(
            self.config.saliency, self.params, beta=self.config.beta, uncertainty_beta=self.config.uncertainty_beta
        )
        self.pruned = [torch.zeros(p.shape, dtype=torch.bool, device=p.device) for p in self.params]
        self.step = 0  # completed real optimizer steps
        self.skipped_steps = 0  # steps whose gradients were not finite
        self.mask_sparsity = 0.0  # the target sparsity the current masks were computed for
        self.mask_updates = 0
        self.finalized = False
        self._skip_pending = False
        self._optimizer: Optional[torch.optim.Optimizer] = None
        self._hooks: list = []

    # ------------------------------------------------------------ wiring
    def attach(self, optimizer: Any) -> "Pruner":
        """Run the pruner on every real step of ``optimizer``; returns self."""
        if self.finalized:
            raise RuntimeError("this Pruner was finalized; create a new one to prune again")
        self.detach()
        inner = _torch_optimizer(optimizer)
        in_optimizer = {id(p) for group in inner.param_groups for p in group["params"]}
        missing = [t.param_name for t in self.targets if id(t.param) not in in_optimizer]
        if missing:
            raise ValueError(
                f"{len(missing)} targeted weights are not trained by this optimizer (frozen, or the optimizer was "
                f"built for another model): {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}"
            )
        self._optimizer = inner
        self._hooks = [
            inner.register_step_pre_hook(lambda opt, args, kwargs: self._pre_step_hook(opt)),
            inner.register_step_post_hook(lambda opt, args, kwargs: self.after_optimizer_step(opt)),
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

    def detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def set_total_steps(self, total_steps: int) -> None:
        """Resolve fractional steps for a run of ``total_steps`` optimizer steps (validates the config)."""
        self.steps = self.config.resolve(total_steps)
        self.total_steps = total_steps

    # ------------------------------------------------------------ per step
    @torch.no_grad()
    def before_optimizer_step(self, grad_scale: Optional[float] = None) -> None:
        """Fold this step's gradients into the saliency. Pass ``grad_scale`` if grads are still loss-scaled."""
        if self.finalized:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if not self.saliency.needs_gradients:
            self._skip_pending = not all_finite(grads)
            return
        prods, finite = gradient_products(self.params, grads, grad_scale)
        self._skip_pending = not finite
        if finite:
            self.saliency.update(self.params, prods)

    @torch.no_grad()
    def after_optimizer_step(self, optimizer: Any = None) -> None:
        """Advance one step: L1, mask update when scheduled, masks applied."""
        if self.finalized:
            return
        if self._skip_pending:
            self._skip_pending = False
            self.skipped_steps += 1
            self.apply_masks()
            return
        self.step += 1
        strength = l1_strength(self.step, l1_lambda=self.config.l1_lambda, ramp_steps=self.steps.l1_ramp_steps)
        if strength > 0:
            source = optimizer if optimizer is not None else self._optimizer
            if source is None:
                raise RuntimeError("l1_lambda > 0 needs the optimizer's learning rate: attach() or pass the optimizer")
            apply_l1_proximal(self.params, _torch_optimizer(source), strength)
        if is_update_step(
            self.step, start=self.steps.start_step, end=self.steps.end_step, every=self.config.update_every, kind=self.config.schedule
        ):
            self.update_masks(self.scheduled_sparsity())
        self.apply_masks()

    def scheduled_sparsity(self, step: Optional[int] = None) -> float:
        c, s = self.config, self.steps
        return target_sparsity(
            self.step if step is None else step,
            initial=c.initial_sparsity, final=c.final_sparsity, start=s.start_step, end=s.end_step, kind=c.schedule,
        )

    @torch.no_grad()
    def update_masks(self, sparsity: float) -> None:
        """Recompute masks for ``sparsity`` (never below the current masks) and apply them."""
        sparsity = max(sparsity, self.mask_sparsity)
        scores = self.saliency.scores(self.params)
        if self.config.scope == "per_layer":
            masks = per_layer_masks(scores, self.pruned, sparsity)
        else:
            masks = global_masks(
                scores, self.pruned, sparsity, self.config.min_layer_sparsity, self.config.max_layer_sparsity
            )
        if self.config.sync_masks:
            broadcast_masks(masks)
        for dst, src in zip(self.pruned, masks):
            dst.copy_(src)
        self.mask_sparsity = sparsity
        self.mask_updates += 1
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Write +0.0 into every pruned position (``masked_fill_``, so no -0.0 is left)."""
        if self.mask_sparsity == 0.0:
            return
        for param, pruned in zip(self.params, self.pruned):
            param.masked_fill_(pruned, 0.0)

    # ------------------------------------------------------------ results
    def report(self) -> dict:
        """Global and per-target sparsity, nonzero counts, current target sparsity and step."""
        return build_report(
            names=[t.name for t in self.targets],
            pruned=self.pruned,
            step=self.step,
            target_sparsity=self.mask_sparsity,
            scheduled_sparsity=self.scheduled_sparsity(),
            extra={"skipped_steps": self.skipped_steps, "mask_updates": self.mask_updates,
                   "model_params": sum(p.numel() for p in self.model.parameters())},
        )

    @torch.no_grad()
    def finalize(self) -> None:
        """Make the masks permanent: pruned weights are +0.0, the pruner detaches and frees its buffers.

        Parameters stay the same objects (an optimizer over them stays valid) and
        state-dict keys are unchanged. Calling it again does nothing.
        """
        if self.finalized:
            return
        self.detach()
        for param, pruned in zip(self.params, self.pruned):
            param.masked_fill_(pruned, 0.0)
        self.saliency.release()
        self.finalized = True

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Masks, saliency buffers and counters; ``load_state_dict`` of it resumes exactly."""
        names = [t.name for t in self.targets]
        return {
            "version": STATE_VERSION,
            "config": self.config.model_dump(mode="json"),
            "targets": names,
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "mask_sparsity": self.mask_sparsity,
            "mask_updates": self.mask_updates,
            "finalized": self.finalized,
            "masks": {n: m.clone() for n, m in zip(names, self.pruned)},
            "saliency": {b: {n: t.clone() for n, t in zip(names, bufs)} for b, bufs in self.saliency.state_dict().items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"pruning state version {state.get('version')!r} is not supported (expected {STATE_VERSION})")
        names = [t.name for t in self.targets]
        if list(state["targets"]) != names:
            missing = sorted(set(names) - set(state["targets"]))
            extra = sorted(set(state["targets"]) - set(names))
            raise ValueError(
                "pruning state was saved for other targets: "
                f"missing from the state: {missing[:5] or 'none'}; unknown to this model: {extra[:5] or 'none'}"
            )
        bad_shapes = [n for n, m in zip(names, self.pruned) if tuple(state["masks"][n].shape) != tuple(m.shape)]
        if bad_shapes:
            raise ValueError(f"pruning state masks have the wrong shape for: {', '.join(bad_shapes)}")
        for name, mask in zip(names, self.pruned):
            mask.copy_(state["masks"][name])
        if not state.get("finalized"):
            self.saliency.load_state_dict({b: [bufs[n] for n in names] for b, bufs in state["saliency"].items()})
        self.step = int(state["step"])
        self.skipped_steps = int(state["skipped_steps"])
        self.mask_sparsity = float(state["mask_sparsity"])
        self.mask_updates = int(state["mask_updates"])
        self.apply_masks()
        if state.get("finalized"):
            self.finalize()
