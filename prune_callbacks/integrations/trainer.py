"""Gradual pruning inside a stock ``transformers.Trainer``: callbacks only.

::

    from prune_callbacks import PruningConfig, make_callbacks
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=make_callbacks(PruningConfig(final_sparsity=0.9)))
    trainer.train()              # prunes while it fine-tunes; masks permanent at the end
    trainer.save_model(out)      # plain from_pretrained loads it, zeros included

How it fits the Trainer (verified against transformers 5.24):

* Steps are optimizer steps. At ``on_train_begin`` the engine builds a core
  `Pruner` (fractional ``start_step`` / ``end_step`` resolve against
  ``state.max_steps``) and attaches it as step hooks of the torch optimizer
  inside the ``AcceleratedOptimizer``. Per update the Trainer runs backward ->
  clipping -> ``on_pre_optimizer_step`` -> ``optimizer.step()`` (our hooks run
  around the inner step: saliency from the accumulated, all-reduced, clipped,
  unscaled gradient; then masks) -> ``on_optimizer_step`` -> scheduler ->
  ``zero_grad`` -> ``on_step_end``. Micro-steps of gradient accumulation and
  steps a fp16 ``GradScaler`` skips never call the inner step, so they change
  nothing. A bad config (``end_step`` beyond ``max_steps``, an ``include``
  pattern matching no module) raises `PruningConfigError` from
  ``trainer.train()`` before the first forward pass.
* Logs: the Trainer appends a copy of each logs dict to ``state.log_history``
  before ``on_log`` runs, and runs reporting callbacks (TensorBoard, W&B,
  the printer) before user callbacks. So the callback (1) writes the figures
  into the logs dict *and* into the ``log_history`` entry just appended, and
  (2) once it knows its Trainer, moves the prune_callbacks callbacks right
  after ``DefaultFlowCallback`` so reporters see the figures in the same call.
  It learns its Trainer from :meth:`bind` or, if not bound, from the call stack
  of ``on_init_end`` / ``on_train_begin`` (the Trainer instance whose callback
  handler holds this callback). Without a Trainer, figures still reach
  ``log_history`` and later callbacks, and a warning says why reporters miss them.
* Checkpoints: ``on_save`` writes ``pruning_state.safetensors`` (masks,
  saliency buffers, counters) into ``checkpoint-N/`` from the process that
  saves; the weights there are already masked. ``train(resume_from_checkpoint=...)``
  does not record the path in ``args``: at ``on_train_begin`` the restored
  ``state.global_step`` > 0 names ``checkpoint-{global_step}`` in ``output_dir``
  (or pass ``resume_from=``), and the run continues exactly.
* Dense baseline: ``evaluate_dense`` calls :func:`evaluate_dense` on the Trainer
  while the model is still dense; metrics are logged as ``dense_*`` (with
  ``dense_step``, the optimizer step it was measured at) next to the later
  ``eval_*``. ``"train_begin"`` (or ``True``): before any step, i.e. the model as
  loaded (a newly initialised classification head is at chance level there).
  ``"before_pruning"``: at ``on_step_end`` of the last optimizer step before the
  first mask update (after ``start_step - 1`` steps of fine-tuning; at train begin
  when pruning starts at step 1). The Trainer's own logging / evaluation flags of
  that step are kept. Skipped when a resumed run is already past that point.
* Under DDP, masks are broadcast from rank 0 at each update (``sync_masks``),
  only the saving process writes files.

Known transformers issue: for BERT-like models whose ``forward`` accepts
``**kwargs`` the Trainer assumes the model scales the loss itself and does not
divide it by ``gradient_accumulation_steps`` (nor average it correctly under
DDP), so gradients are accumulation-times too large. Taylor / PLATON /
movement saliency and the gradient-norm clipping see that. Set
``trainer.model_accepts_loss_kwargs = False`` after building the Trainer.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Optional, Union

from transformers import Trainer, TrainerCallback

from ..config import PruningConfigError, make_config
from .trainer_engine import TrainerPruningEngine, engine_for
from .trainer_dense import DenseTiming, dense_timing, evaluate_dense
from .trainer_support import (
    ConfigLike,
    PruningCallbacks,
    add_to_logs,
    make_trainer_config,
    put_before_reporters,
    trainer_on_stack,
)

__all__ = [
    "make_callbacks",
    "PruningCallbacks",
    "GradualPruningCallback",
    "L1RegularizationCallback",
    "PermanentMaskCallback",
    "evaluate_dense",
]

logger = logging.getLogger(__name__)

class _TrainerPruningCallback(TrainerCallback):
    """Shared plumbing: the engine and the Trainer the callback was bound to (weakly)."""

    def __init__(self, engine: Optional[TrainerPruningEngine]):
        self.engine = engine
        self._trainer_ref: Optional[weakref.ref] = None

    @property
    def trainer(self) -> Optional[Trainer]:
        return self._trainer_ref() if self._trainer_ref is not None else None

    def bind(self, trainer: Trainer) -> "_TrainerPruningCallback":
        """Tell the callback its Trainer (dense evaluation, reporters' order). Usually found automatically."""
        self._trainer_ref = weakref.ref(trainer)
        put_before_reporters(trainer, _TrainerPruningCallback)
        return self

    def _find_trainer(self) -> Optional[Trainer]:
        if self.trainer is None:
            trainer = trainer_on_stack(self)
            if trainer is not None:
                self.bind(trainer)
        return self.trainer

    def on_init_end(self, args, state, control, **kwargs):
        self._find_trainer()


# ---------------------------------------------------------------- the callbacks
class GradualPruningCallback(_TrainerPruningCallback):
    """Saliency, schedule, masks, checkpoints and sparsity logs (see the module docstring).

    ``GradualPruningCallback(config | path | None, *, evaluate_dense=False, log_per_group=True,
    resume_from=None, **config_overrides)``. Logged at every logging step: ``sparsity/global``,
    ``sparsity/target`` and ``sparsity/<layer kind>``. ``evaluate_dense`` logs ``dense_*`` metrics
    of the unpruned model and ``dense_step`` (needs an ``eval_dataset``): ``"train_begin"`` (or
    ``True``) before any step, ``"before_pruning"`` after the last optimizer step before the first
    mask update (the model fine-tuned up to pruning, still dense); ``False``: none.

    Transformers bug: for BERT-like models under gradient accumulation or DDP the Trainer does not
    divide the loss by the accumulation steps (the model "accepts loss kwargs"); the saliency
    magnitudes (and clipping) see gradients that are too large. Set
    ``trainer.model_accepts_loss_kwargs = False``.
    """

    def __init__(self, config: ConfigLike = None, *, evaluate_dense: DenseTiming = False, log_per_group: bool = True,
                 resume_from: Optional[str] = None, engine: Optional[TrainerPruningEngine] = None, **overrides):
        timing = dense_timing(evaluate_dense)
        if engine is None:
            engine = TrainerPruningEngine(make_trainer_config(config, overrides), resume_from=resume_from)
        elif config is not None or overrides or resume_from is not None:
            raise TypeError("pass either engine= or a config, not both")
        super().__init__(engine)
        self.evaluate_dense = evaluate_dense
        self.dense_timing = timing  # None, "train_begin" or "before_pruning"
        self.log_per_group = log_per_group
        self._warned_unbound = False
        self._dense_at: Optional[int] = None  # pruner step after which the dense evaluation is still due

    @property
    def pruner(self):
        return self.engine.pruner

    def _check_dense(self, trainer: Optional[Trainer]) -> Trainer:
        if trainer is None:
            raise RuntimeError(f"evaluate_dense={self.evaluate_dense!r} needs the Trainer: "
                               "call callbacks.bind(trainer) before train()")
        if trainer.eval_dataset is None:
            raise ValueError(f"evaluate_dense={self.evaluate_dense!r} needs an eval_dataset on the Trainer")
        return trainer

    def _evaluate_dense(self, control) -> None:
        trainer = self._check_dense(self.trainer)
        # Trainer.evaluate clears the handler's should_log / should_evaluate: keep this step's own log and eval
        flags = control.should_log, control.should_evaluate
        evaluate_dense(trainer)  # dense_step is added in on_log
        control.should_log, control.should_evaluate = flags

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        trainer = self._find_trainer()
        if self.dense_timing and state.global_step == 0:
            self._check_dense(trainer)  # before any compute
        self.engine.start(args, state, model, optimizer)  # validates the config before any compute
        self._dense_at = None
        if not self.dense_timing:
            return
        pruner = self.engine.pruner
        at = 0 if self.dense_timing == "train_begin" else self.engine.first_update_step() - 1
        if pruner.step > at or pruner.mask_updates > 0:
            logger.info("prune_callbacks: resumed run past step %d, the dense model is gone; dense evaluation skipped",
                        at)
        elif pruner.step == at:
            self._evaluate_dense(control)
        else:
            self._dense_at = at

    def on_step_end(self, args, state, control, **kwargs):
        pruner, at = self.engine.pruner, self._dense_at
        if at is None or pruner is None or pruner.step < at:
            return
        self._dense_at = None
        if pruner.step == at and pruner.mask_updates == 0:
            self._evaluate_dense(control)
        else:  # not expected: the pruner counts every real step and updates masks only after `at`
            logger.warning("prune_callbacks: the model was pruned before step %d; dense evaluation skipped", at)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or self.engine.pruner is None:
            return
        figures = self.engine.figures(self.log_per_group)
        if "dense_step" not in logs and any(k.startswith("dense_") for k in logs):
            figures = {"dense_step": state.global_step, **figures}  # when the dense baseline was measured
        add_to_logs(state, logs, figures)
        reporters = [args.report_to] if isinstance(args.report_to, str) else list(args.report_to or [])
        if self.trainer is None and any(r != "none" for r in reporters) and not self._warned_unbound:
            self._warned_unbound = True
            logger.warning(
                "prune_callbacks: could not find the Trainer, so reporting callbacks (%s) run before this one and "
                "miss the sparsity figures (log_history has them). Call callbacks.bind(trainer).", reporters,
            )

    def on_save(self, args, state, control, **kwargs):
        self.engine.save(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        self.engine.stop()


class L1RegularizationCallback(_TrainerPruningCallback):
    """Proximal L1 on the targeted weights after every optimizer step (see `prune_callbacks.regularization`).

    On its own, ``L1RegularizationCallback(l1_lambda, l1_ramp_steps=0, include=None, exclude=())``
    runs L1 without pruning (its engine never masks anything) and logs ``l1/strength`` and
    ``l1/zero_fraction``. In a `make_callbacks` set (``l1_lambda`` in the config) it shares the
    pruning engine, which applies L1, and only adds the L1 figures to the logs.
    """

    def __init__(self, l1_lambda: Optional[float] = None, *, l1_ramp_steps: Union[int, float] = 0,
                 include: Optional[list] = None, exclude: tuple = (), resume_from: Optional[str] = None,
                 engine: Optional[TrainerPruningEngine] = None):
        self.drives = engine is None
        if engine is None:
            if not l1_lambda or l1_lambda <= 0:
                raise PruningConfigError(f"l1_lambda={l1_lambda!r} is invalid: L1RegularizationCallback needs l1_lambda > 0")
            config = make_config(
                final_sparsity=0.0, saliency="magnitude", schedule="oneshot", start_step=0, end_step=0,
                l1_lambda=l1_lambda, l1_ramp_steps=l1_ramp_steps, include=include, exclude=list(exclude),
            )
            engine = TrainerPruningEngine(config, resume_from=resume_from)
        super().__init__(engine)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._find_trainer()
        if self.drives:
            self.engine.start(args, state, model, optimizer)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.engine.pruner is not None:
            add_to_logs(state, logs, self.engine.l1_figures())

    def on_save(self, args, state, control, **kwargs):
        if self.drives:
            self.engine.save(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        if self.drives:
            self.engine.stop()


class PermanentMaskCallback(_TrainerPruningCallback):
    """At train end: masks made permanent (pruned weights are +0.0, hooks and buffers released).

    ``PermanentMaskCallback(*, save_sparse_to=None)``. On its own it finalizes whichever
    prune_callbacks engine prunes the Trainer's model. ``save_sparse_to``: also write a compressed
    sparse checkpoint there (`prune_callbacks.sparse_io.save_sparse`, with the Trainer's
    tokenizer / processor) from the saving process.
    """

    def __init__(self, *, save_sparse_to: Optional[Union[str, os.PathLike]] = None,
                 engine: Optional[TrainerPruningEngine] = None):
        super().__init__(engine)
        self.save_sparse_to = save_sparse_to

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        engine = self.engine if self.engine is not None and self.engine.pruner is not None else engine_for(model)
        if engine is None:
            logger.warning("prune_callbacks: PermanentMaskCallback found no pruning engine on this model; nothing to finalize")
        else:
            engine.finish(args, state)
        if self.save_sparse_to is not None and args.should_save:
            from ..sparse_io import save_sparse

            save_sparse(model, self.save_sparse_to, tokenizer=processing_class)


def make_callbacks(config: ConfigLike = None, *, evaluate_dense: DenseTiming = False, finalize: bool = True,
                   save_sparse_to: Optional[Union[str, os.PathLike]] = None, log_per_group: bool = True,
                   resume_from: Optional[str] = None, distillation=None, **overrides) -> PruningCallbacks:
    """The callbacks sharing one pruning engine: ``GradualPruningCallback``, ``L1RegularizationCallback``
    (when ``l1_lambda > 0``) and ``PermanentMaskCallback`` (unless ``finalize=False``).

    ``config``: a `PruningConfig`, a dict, a path to a YAML recipe (its ``pruning:`` section, or the
    whole mapping), or None for the defaults; ``overrides`` are PruningConfig fields.
    ``evaluate_dense``: False, True / ``"train_begin"`` or ``"before_pruning"`` (see `GradualPruningCallback`).
    ``distillation``: a `DistillationConfig` or dict adds a ``DistillationCallback`` sharing the engine
    (see `prune_callbacks.integrations.distillation_callback`).
    """
    engine = TrainerPruningEngine(make_trainer_config(config, overrides), resume_from=resume_from)
    callbacks: list = [GradualPruningCallback(engine=engine, evaluate_dense=evaluate_dense, log_per_group=log_per_group)]
    if engine.config.l1_lambda > 0:
        callbacks.append(L1RegularizationCallback(engine=engine))
    if finalize:
        callbacks.append(PermanentMaskCallback(engine=engine, save_sparse_to=save_sparse_to))
    if distillation is not None:  # distillation from a dense teacher (issue 12)
        from .distillation_callback import DistillationCallback

        callbacks.append(DistillationCallback(distillation, engine=engine, resume_from=resume_from))
    return PruningCallbacks(callbacks, engine)
