"""`AccelerateDistillationHook`: knowledge distillation in a hand-written Accelerate loop.

Two more lines next to the pruning hook; the loop body does not change (``model(**batch).loss``
already holds the distillation term, see `prune_callbacks.controllers.distillation.distiller`)::

    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    pruning = AcceleratePruningHook(PruningConfig(final_sparsity=0.9), total_steps=steps)
    pruning.register(accelerator, model, optimizer)
    distill = AccelerateDistillationHook(DistillationConfig(hardness=1.0))
    distill.register(accelerator, model, optimizer, pruning=pruning)   # after prepare, before load_state
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss)
            optimizer.step(); scheduler.step(); optimizer.zero_grad()
    distill.detach(); pruning.finalize()

* ``snapshot="before_pruning"`` (``"self"`` teacher): copied in a step post-hook of the torch
  optimizer right after the last real optimizer step before the pruner's first mask update
  (the step `TrainerPruningEngine.first_update_step` names); at ``register`` when that is step 0.
* ``accelerator.save_state`` / ``load_state`` store and restore a ``"self"`` teacher exactly
  (``register`` calls ``register_for_checkpointing``; register it after the pruning hook and
  before ``load_state``, in the same order in every run).
* ``figures()``: running means of ``distill/kd_loss``, ``distill/task_loss``; with trackers they
  are also sent to ``accelerator.log`` every ``log_every`` optimizer steps (main process).
* Under ``accelerator.accumulate`` the loop's ``accelerator.backward`` divides the returned loss
  by the accumulation steps; the KD term (a per-example / per-token mean) is scaled with it.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from prune_callbacks.controllers.distillation import DistillationConfig, Distiller, make_distillation_config
from prune_callbacks.controllers.distillation import teacher as teacher_lib
from prune_callbacks.controllers.distillation.config import DistillationConfigError
from prune_callbacks.engine.pruner import _torch_optimizer
from prune_callbacks.integrations.accelerate.support import check_accelerator_supported

__all__ = ["AccelerateDistillationHook"]


class AccelerateDistillationHook:
    """Distils the model of an Accelerate loop from a frozen teacher; see the module docstring."""

    def __init__(self, config: "DistillationConfig | dict | None" = None, *, log_every: Optional[int] = 10, **overrides):
        self.config = make_distillation_config(config, **overrides)
        self.distiller = Distiller(self.config)
        self.log_every = log_every or 0
        self.accelerator: Any = None
        self._pruner = None
        self._snapshot_at: Optional[int] = None
        self._handle = None

    def register(self, accelerator: Any, model: nn.Module, optimizer: Any, *, pruning: Any = None) -> Distiller:
        """Patch ``model``'s forward (the model returned by ``accelerator.prepare``) and register for
        checkpointing. ``pruning``: the registered `AcceleratePruningHook` (needed for ``"before_pruning"``)."""
        if self.accelerator is not None:
            raise RuntimeError("this AccelerateDistillationHook is already registered")
        check_accelerator_supported(accelerator)
        cfg = self.config
        pruner = getattr(pruning, "pruner", None)
        if cfg.self_teacher and cfg.snapshot == "before_pruning":
            if pruner is None:
                raise DistillationConfigError(
                    "snapshot='before_pruning' needs pruning=<the registered AcceleratePruningHook>; without pruning "
                    "use snapshot='train_begin'"
                )
            self._snapshot_at = teacher_lib.snapshot_step(pruner)
        self.distiller.attach(model)
        self._pruner = pruner
        if self.distiller.teacher is None and self._snapshot_at is not None and pruner.step >= self._snapshot_at:
            self.distiller.take_snapshot(pruner.step)
        # registered after the pruner's hooks: runs after its step counter and masks are updated
        self._handle = _torch_optimizer(optimizer).register_step_post_hook(lambda opt, args, kwargs: self._after_step())
        self.accelerator = accelerator
        accelerator.register_for_checkpointing(self)
        return self.distiller

    def _after_step(self) -> None:
        d, pruner = self.distiller, self._pruner
        if self._snapshot_at is not None and d.teacher is None and pruner is not None:
            if pruner.step >= self._snapshot_at and pruner.mask_updates == 0:
                d.take_snapshot(pruner.step)
        step = pruner.step if pruner is not None else None
        acc = self.accelerator
        if (self.log_every and step and step % self.log_every == 0 and getattr(acc, "trackers", None)
                and getattr(acc, "is_main_process", True)):
            values = d.figures()
            if values:
                acc.log(values, step=step)

    def figures(self, reset: bool = True) -> dict[str, float]:
        """``distill/*`` running means since the last call (this process)."""
        return self.distiller.figures(reset)

    def detach(self) -> None:
        """Restore the model's original forward and remove the step hook (the teacher is released)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.distiller.detach()

    # ------------------------------------------------------------ accelerator.save_state / load_state
    def state_dict(self) -> dict:
        """A ``"self"`` teacher's tensors and the step it was copied after (empty otherwise)."""
        d = self.distiller
        if not (self.config.self_teacher and d.teacher is not None):
            return {"teacher_step": None}
        return {"teacher_step": d.teacher_step, "teacher": {k: v for k, v in d.teacher.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        if "teacher" not in state:
            return
        d = self.distiller
        if d.model is None:
            raise RuntimeError("register the hook before accelerator.load_state()")
        teacher = teacher_lib.snapshot(d.model, self.config.teacher_dtype)  # structure; every tensor replaced
        teacher.load_state_dict(state["teacher"], strict=True)
        d.set_teacher(teacher_lib.freeze(teacher), state.get("teacher_step"))
