"""Accuracy guard in a hand-written Accelerate loop: `AcceleratePruningHook` with ``evaluate=`` (issue 15).

The user passes an evaluation function; the hook decides when it runs::

    def evaluate():                       # every process calls it, at the same steps
        ...                               # e.g. a loop over a prepared eval loader + gather_for_metrics
        return {"eval_accuracy": acc}     # a mapping of metrics (or one number)

    hook = AcceleratePruningHook(PruningConfig(final_sparsity=0.95,
                                               accuracy_guard={"metric": "eval_accuracy", "max_drop": 0.01}),
                                 total_steps=n)
    hook.register(accelerator, model, optimizer, evaluate=evaluate)
    ...                                   # the loop body does not change
    hook.finalize()                       # final check at the final sparsity, then masks made permanent

The controller is the one of the Trainer path (`prune_callbacks.controllers.guard.controller.AccuracyGuard`,
one per guarded config, added by `add_guards`); this module only decides when to evaluate:

* **baseline**, in an optimizer pre-hook (the weights are those after the previous step):
  ``accuracy_guard.baseline="before_pruning"`` (default) at the step whose hook computes the
  first masks, i.e. on the model after the last dense step; ``"train_begin"`` at the first real
  step, on the weights the run started with. ``evaluate`` runs under ``torch.no_grad`` and the
  model's train/eval mode is restored afterwards. A metric name the evaluation does not return
  fails there, before any weight is pruned. Not measured again after ``accelerator.load_state``:
  the baseline comes back with the state.
* **during pruning**: after every ``every``-th optimizer step once masks exist (after that step's
  mask update), the decision (continue / hold / rollback / stop) is taken on the result.
* **final check**: ``hook.finalize()`` evaluates at the final sparsity and rolls back to the last
  good masks if that fails (`AccuracyGuard.final_check`), before the masks are made permanent.

Several processes: ``evaluate`` is called on every process at the same steps (so it may use
collectives such as ``accelerator.gather_for_metrics``), and the controller broadcasts rank 0's
value before each decision, so every process takes rank 0's decision even when the local values
differ (a rank that evaluates on its own shard only, say). Masks and the restored weights are then
the same everywhere: masks are rank-0's after every update, and DDP keeps the weights equal.

State: ``hook.state_dict()`` carries the controllers' state under ``"accuracy_guard"`` (tensors,
numbers, lists, dicts, None: ``torch.load(weights_only=True)`` reads it), so ``save_state`` /
``load_state`` in the middle of a hold or after a rollback resume the same decisions.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from prune_callbacks.controllers.guard.controller import AccuracyGuard, add_guards, baseline_due, evaluation_due, metric_value
from prune_callbacks.engine.pruner import Pruner, _torch_optimizer
from prune_callbacks.integrations.guard_verdict import tell_verdict

STATE_KEY = "accuracy_guard"
_HINT = "return a mapping with this key from the evaluate function given to register()"


class GuardWiring:
    """The guards of one hook's pruner, fed by the user's ``evaluate``; created by ``register``."""

    def __init__(self, pruner: Pruner, optimizer: Any, evaluate: Callable[[], Any]):
        if not callable(evaluate):
            raise TypeError(f"register(..., evaluate=...) needs a callable returning the metrics, got {type(evaluate).__name__}")
        self.pruner, self.evaluate_fn = pruner, evaluate
        self.guards: list[AccuracyGuard] = add_guards(pruner)
        self._last_eval = -1
        inner = _torch_optimizer(optimizer)
        self._handle = inner.register_step_pre_hook(lambda opt, args, kwargs: self._before_step())

    # ------------------------------------------------------------ evaluations
    def _evaluate(self) -> Any:
        model = self.pruner.model
        training = model.training
        try:
            with torch.no_grad():
                return self.evaluate_fn()
        finally:
            model.train(training)

    def _before_step(self) -> None:
        """The baselines due before this step (`baseline_due`); nothing once measured or loaded."""
        due = baseline_due(self.pruner, self.guards)
        if not due:
            return
        metrics = self._evaluate()
        for g in due:
            g.set_baseline(metric_value(metrics, g.config, _HINT), self.pruner.step)

    def after_step(self) -> None:
        """Called by the hook after the pruner's own post-step work (masks of this step already updated)."""
        pruner = self.pruner
        if pruner.step == self._last_eval or not evaluation_due(pruner, self.guards):
            return
        self._last_eval = pruner.step
        metrics = self._evaluate()
        for g in self.guards:
            g.report_metric(metric_value(metrics, g.config, _HINT), pruner.step)

    def final_check(self) -> list[dict]:
        """`AccuracyGuard.final_check` of every guard (before the pruner is finalized)."""
        if self.pruner.finalized:
            return [g.final for g in self.guards]
        self._handle.remove()
        finals = [g.final_check(lambda g=g: metric_value(self._evaluate(), g.config, _HINT), self.pruner.step)
                  for g in self.guards]
        if self._is_main():
            for g, final in zip(self.guards, finals):
                tell_verdict(g.config, final)  # a warning whatever the logging setup (INFO is usually dropped)
        return finals

    @staticmethod
    def _is_main() -> bool:
        import torch.distributed as dist

        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0

    # ------------------------------------------------------------ results and state
    def figures(self) -> dict:
        out: dict = {}
        for g in self.guards:
            out.update(g.figures())
        return out

    def report(self) -> list[dict]:
        return [g.report() for g in self.guards]

    def state_dict(self) -> list[dict]:
        return [g.state_dict() for g in self.guards]

    def load_state_dict(self, states: Optional[list]) -> None:
        if states is None or len(states) != len(self.guards):
            raise RuntimeError(f"resuming a guarded run, but the saved state holds "
                               f"{'no' if states is None else len(states)} accuracy-guard state(s) for "
                               f"{len(self.guards)} guarded config(s)")
        for g, state in zip(self.guards, states):
            g.load_state_dict(state)
        self._last_eval = self.pruner.step
