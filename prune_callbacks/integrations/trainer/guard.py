"""`AccuracyGuardCallback`: feeds the Trainer's own evaluations to the accuracy guard (``PruningConfig.accuracy_guard``).

* ``on_train_begin`` (after the engine built the pruner): adds one
  `~prune_callbacks.controllers.guard.controller.AccuracyGuard` per guarded group. The dense baseline
  is measured with ``trainer.evaluate()`` (the Trainer's ``eval_dataset`` and
  ``compute_metrics``) at ``accuracy_guard.baseline``: ``before_pruning`` (default) at the
  end of the last optimizer step before the first mask update, ``train_begin`` here, before
  any step. No ``eval_dataset`` is an error here; a metric name that the evaluation does not
  return (the keys it returns are listed) is an error at that first evaluation, before any
  weight is pruned.
* every ``every`` optimizer steps once masks exist: the guard's own ``trainer.evaluate()``
  (the Trainer's ``eval_dataset`` and ``compute_metrics``, logged as usual) unless the user's
  schedule evaluates at that step anyway; ``on_evaluate`` hands the user's evaluations to the
  guard too. The guard's own evaluations are not the training loop's, so they never enter
  best-model tracking: ``metric_for_best_model`` / ``load_best_model_at_end`` select among the
  evaluations the user scheduled, as without the guard.
* ``on_train_end`` (before `PermanentMaskCallback` finalizes): `AccuracyGuard.final_check`
  evaluates at the final sparsity and rolls back to the last good masks if it fails, so
  the reported answer is measured where the run ends.
* ``on_save``: the guards' state goes to ``checkpoint-N/guard_state.safetensors`` (tensors +
  JSON metadata, no pickle); a resumed run reads it from the folder the pruning state
  came from.
* ``on_log``: the ``guard/*`` figures of :mod:`prune_callbacks.core.figures`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from prune_callbacks.controllers.guard.controller import AccuracyGuard, add_guards, baseline_due, evaluation_due, metric_value
from prune_callbacks.core.state_io import save_tensors_atomic
from prune_callbacks.integrations.guard_verdict import tell_verdict
from prune_callbacks.integrations.trainer import checkpoint as ckpt
from prune_callbacks.integrations.trainer.binding import _TrainerPruningCallback
from prune_callbacks.integrations.trainer.logs import add_figures

logger = logging.getLogger(__name__)

GUARD_FILE = "guard_state.safetensors"
_META_KEY = "prune_callbacks.controllers.guard"


class AccuracyGuardCallback(_TrainerPruningCallback):
    """Part of a `make_callbacks` set when a config has ``accuracy_guard``; needs ``callbacks.bind(trainer)``."""

    def __init__(self, engine):
        super().__init__(engine)
        self.guards: list[AccuracyGuard] = []
        self._quiet = False  # our own evaluate() calls are not fed through on_evaluate

    def report(self) -> list[dict]:
        return [g.report() for g in self.guards]

    def _evaluate(self) -> dict:
        self._quiet = True
        try:
            return self.trainer.evaluate()
        finally:
            self._quiet = False

    def _value(self, metrics: dict, guard: AccuracyGuard) -> float:
        return metric_value(metrics, guard.config, "give compute_metrics, or pick one of these")

    def on_train_begin(self, args, state, control, **kwargs):
        pruner = self.engine.pruner
        trainer = self.trainer
        if trainer is None:
            raise RuntimeError("accuracy_guard needs the Trainer: call callbacks.bind(trainer) before train()")
        if trainer.eval_dataset is None:
            raise ValueError("accuracy_guard needs an eval_dataset on the Trainer (its metric is measured on it)")
        if self.guards and self.guards[0].group is pruner.groups[0]:
            for g in self.guards:
                g.install()
            return  # a second train() of the same run
        self.guards = add_guards(pruner)
        if state.global_step > 0 and self.engine.resumed_from is not None:
            self._load(Path(self.engine.resumed_from).parent / GUARD_FILE)
        self._measure_baselines(control)

    def _measure_baselines(self, control) -> None:
        pruner = self.engine.pruner
        due = baseline_due(pruner, self.guards)
        if not due:
            return
        flags = control.should_log, control.should_evaluate  # Trainer.evaluate clears them: keep this step's
        metrics = self._evaluate()
        control.should_log, control.should_evaluate = flags
        for g in due:
            g.set_baseline(self._value(metrics, g), pruner.step)

    def on_step_end(self, args, state, control, **kwargs):
        pruner = self.engine.pruner
        if pruner is None:
            return
        self._measure_baselines(control)
        if evaluation_due(pruner, self.guards) and not control.should_evaluate:
            # an evaluation of the guard's own, not the Trainer's: Trainer.evaluate() is not the training loop's
            # evaluation, so it does not enter best-model tracking (metric_for_best_model / load_best_model_at_end)
            # nor step a ReduceLROnPlateau scheduler; a step the user's schedule evaluates anyway is fed by on_evaluate
            flags = control.should_log, control.should_save
            metrics = self._evaluate()
            control.should_log, control.should_save = flags
            for g in self.guards:
                g.report_metric(self._value(metrics, g), pruner.step)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        pruner = self.engine.pruner
        if self._quiet or metrics is None or pruner is None or pruner.finalized or pruner.mask_updates == 0:
            return
        for g in self.guards:
            g.report_metric(self._value(metrics, g), pruner.step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        figures = {}
        for g in self.guards:
            figures.update(g.figures())
        if figures:
            add_figures(state, logs, figures)

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save or not self.guards:
            return
        folder = Path(ckpt.checkpoint_dir(args, state))
        folder.mkdir(parents=True, exist_ok=True)
        tensors, meta = {}, []
        for i, g in enumerate(self.guards):
            sd = g.state_dict()
            meta.append(sd["json"])
            tensors.update({f"{i}/{k}": v.contiguous().cpu() for k, v in sd["tensors"].items()})
        save_tensors_atomic(tensors, folder / GUARD_FILE, metadata={_META_KEY: json.dumps(meta)})

    def _load(self, path: Path) -> None:
        from safetensors import safe_open

        if not path.is_file():
            raise RuntimeError(f"resuming a guarded run, but there is no accuracy-guard state at {path}")
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = json.loads(f.metadata()[_META_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        for i, g in enumerate(self.guards):
            prefix = f"{i}/"
            g.load_state_dict({"json": meta[i], "tensors": {k[len(prefix):]: v for k, v in tensors.items()
                                                             if k.startswith(prefix)}})

    def on_train_end(self, args, state, control, **kwargs):
        pruner = self.engine.pruner
        if pruner is None or pruner.finalized or not self.guards:
            return
        figures = {}
        for g in self.guards:
            final = g.final_check(lambda: self._value(self._evaluate(), g), pruner.step)
            figures.update(g.figures())
            if state.is_world_process_zero:
                tell_verdict(g.config, final)  # a warning whatever the logging setup (INFO is usually dropped)
        if figures:
            # the final figures into log_history (saved in trainer_state.json by the next save_state / checkpoint)
            state.log_history.append({**figures, "step": state.global_step})

