"""When, during a run, `GradualPruningCallback` evaluates the dense baseline (``evaluate_dense``).

``"train_begin"`` (or ``True``): at train begin, before any step; ``"before_pruning"``: after the
last optimizer step before the first mask update (at train begin when that is step 0). A run
resumed past that point skips it: the dense model is gone. The evaluation itself and the
allowed values: :mod:`.dense`. No transformers import here.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Optional

from prune_callbacks.integrations.trainer.dense import DenseTiming, dense_timing, evaluate_dense

if TYPE_CHECKING:
    from transformers import Trainer

logger = logging.getLogger("prune_callbacks.integrations.trainer.callbacks")


class DenseBaseline:
    """The dense evaluation of one callback: its checks, and the pruner step at which it is still due."""

    def __init__(self, evaluate_dense: DenseTiming):
        self.setting = evaluate_dense
        self.timing = dense_timing(evaluate_dense)  # None, "train_begin" or "before_pruning"
        self.due_at: Optional[int] = None  # pruner step after which the dense evaluation is still due

    def check(self, trainer: Optional["Trainer"]) -> "Trainer":
        """The Trainer to evaluate with; raises when it is missing or has no ``eval_dataset``."""
        if trainer is None:
            raise RuntimeError(f"evaluate_dense={self.setting!r} needs the Trainer: "
                               "call callbacks.bind(trainer) before train()")
        if trainer.eval_dataset is None:
            raise ValueError(f"evaluate_dense={self.setting!r} needs an eval_dataset on the Trainer")
        return trainer

    def evaluate(self, trainer: Optional["Trainer"], control: Any) -> None:
        trainer = self.check(trainer)
        # Trainer.evaluate clears the handler's should_log / should_evaluate: keep this step's own log and eval
        flags = control.should_log, control.should_evaluate
        evaluate_dense(trainer)  # dense_step is added in on_log
        control.should_log, control.should_evaluate = flags

    def before_start(self, trainer: Optional["Trainer"], state: Any) -> None:
        """At train begin, before the engine starts: fail before any compute if the evaluation cannot run."""
        if self.timing and state.global_step == 0:
            self.check(trainer)

    def after_start(self, engine: Any, trainer: Optional["Trainer"], control: Any) -> None:
        """At train begin, once the engine's pruner exists: evaluate now, schedule it, or skip it (resumed)."""
        self.due_at = None
        if not self.timing:
            return
        pruner = engine.pruner
        first = engine.first_update_step()
        at = 0 if self.timing == "train_begin" or first is None else first - 1
        if pruner.step > at or pruner.mask_updates > 0:
            logger.info("prune_callbacks: resumed run past step %d, the dense model is gone; dense evaluation skipped",
                        at)
        elif pruner.step == at:
            self.evaluate(trainer, control)
        else:
            self.due_at = at

    def at_step_end(self, pruner: Any, trainer: Optional["Trainer"], control: Any) -> None:
        """After each optimizer step: evaluate once the pruner reaches the step it is due at."""
        at = self.due_at
        if at is None or pruner is None or pruner.step < at:
            return
        self.due_at = None
        if pruner.step == at and pruner.mask_updates == 0:
            self.evaluate(trainer, control)
        else:  # not expected: the pruner counts every real step and updates masks only after `at`
            logger.warning("prune_callbacks: the model was pruned before step %d; dense evaluation skipped", at)
