"""The ``TrainerCallback`` classes and `make_callbacks`: Trainer events -> engine calls.

How it fits the Trainer (verified against transformers 5.24):

* Steps are optimizer steps. At ``on_train_begin`` the engine builds a core
  `Pruner` (fractional ``start_step`` / ``end_step`` resolve against
  ``state.max_steps``) and attaches it as step hooks of the torch optimizer
  inside the ``AcceleratedOptimizer``. Per update the Trainer runs backward ->
  clipping -> ``on_pre_optimizer_step`` -> ``optimizer.step()`` (our hooks run
  around the inner step: saliency from the accumulated, all-reduced, clipped,
  unscaled gradient; then masks) -> ``on_optimizer_step`` -> scheduler ->
  ``zero_grad`` -> ``on_step_end``. Micro-steps of gradient accumulation and
  steps a fp16 ``GradScaler`` skips never call the inner step. A bad config
  raises `PruningConfigError` from ``trainer.train()`` before the first forward.
* The Trainer hands callbacks no reference to itself. ``callbacks.bind(trainer)``
  (:mod:`.binding`) gives it (adding the callbacks if they are not there yet); it is needed for
  (1) reporters (TensorBoard, W&B, the printer) to see the figures in the same
  ``on_log`` (:mod:`.logs`), (2) the dense baseline (:mod:`.dense`, when:
  :mod:`.dense_baseline`) and (3) fixing
  ``trainer.model_accepts_loss_kwargs`` (:mod:`.loss_scaling`). Unbound, figures
  still reach ``log_history`` and later callbacks, and warnings say what is missing.
* Figures: :mod:`prune_callbacks.core.figures` (``sparsity/global``,
  ``sparsity/scheduled``, ``sparsity/masks_target``, ``sparsity/<layer kind>``,
  ``pruning/*``, ``l1/*``). They are logged, never added to the metrics that
  ``train()`` / ``evaluate()`` return.
* Checkpoints and resume from any folder, dense checkpoints: :mod:`.checkpoint`.
* ``load_best_model_at_end``: at train end the run's final masks are applied to
  the reloaded best weights (:meth:`TrainerPruningEngine.finish`).
* Under DDP, masks are broadcast from rank 0 at each update (``sync_masks``);
  only the saving process writes files.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Union

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from prune_callbacks.core.config import L1Config, PruningConfigError
from prune_callbacks.integrations.trainer import checkpoint as ckpt
from prune_callbacks.integrations.configs import ConfigLike, make_configs
from prune_callbacks.integrations.trainer.binding import PruningCallbacks, _TrainerPruningCallback
from prune_callbacks.integrations.trainer.dense import DenseTiming, evaluate_dense
from prune_callbacks.integrations.trainer.dense_baseline import DenseBaseline
from prune_callbacks.integrations.trainer.engine import TrainerPruningEngine, engine_for
from prune_callbacks.integrations.trainer.logs import add_figures
from prune_callbacks.integrations.trainer.loss_scaling import loss_scaling_problem

__all__ = [
    "make_callbacks",
    "PruningCallbacks",
    "GradualPruningCallback",
    "L1RegularizationCallback",
    "PermanentMaskCallback",
    "PruningStateRecord",
    "evaluate_dense",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- the callbacks
class GradualPruningCallback(_TrainerPruningCallback):
    """Saliency, schedule, masks, checkpoints and sparsity logs (see the module docstring).

    ``GradualPruningCallback(config | list | path | None, *, evaluate_dense=False, log_per_group=True,
    resume_from=None, fix_loss_scaling=True, **config_overrides)``. Logged at every logging step:
    the :mod:`prune_callbacks.core.figures` keys. ``evaluate_dense`` logs ``dense_*`` metrics of the
    unpruned model and ``dense_step`` (needs an ``eval_dataset`` and ``callbacks.bind(trainer)``):
    ``"train_begin"`` (or ``True``) before any step, ``"before_pruning"`` after the last optimizer
    step before the first mask update; ``False``: none. ``fix_loss_scaling``: with the Trainer
    bound, set ``trainer.model_accepts_loss_kwargs = False`` where the Trainer would mis-scale the
    loss (False: only warn). Prefer `make_callbacks`: its set also records where checkpoints'
    pruning states are (resume from any folder, dense checkpoints).
    """

    def __init__(self, config: ConfigLike = None, *, evaluate_dense: DenseTiming = False, log_per_group: bool = True,
                 resume_from: Optional[str] = None, fix_loss_scaling: bool = True,
                 engine: Optional[TrainerPruningEngine] = None, **overrides):
        dense = DenseBaseline(evaluate_dense)  # an invalid value fails first
        if engine is None:
            engine = TrainerPruningEngine(make_configs(config, overrides), resume_from=resume_from)
        elif config is not None or overrides or resume_from is not None:
            raise TypeError("pass either engine= or a config, not both")
        super().__init__(engine)
        self.dense = dense
        self.log_per_group = log_per_group
        self.fix_loss_scaling = fix_loss_scaling
        self._warned_unbound = False

    @property
    def pruner(self):
        return self.engine.pruner

    @property
    def evaluate_dense(self) -> DenseTiming:
        return self.dense.setting

    @property
    def dense_timing(self) -> Optional[str]:
        """None, ``"train_begin"`` or ``"before_pruning"``."""
        return self.dense.timing

    def _check_loss_scaling(self, args, model) -> None:
        problem = loss_scaling_problem(model, args)
        if problem is None:
            return
        trainer = self.trainer
        if trainer is None:
            logger.warning(
                "prune_callbacks: %s, unless trainer.model_accepts_loss_kwargs = False was set. Call "
                "callbacks.bind(trainer) to have it checked and set.", problem)
        elif trainer.model_accepts_loss_kwargs and getattr(trainer, "compute_loss_func", None) is None:
            if self.fix_loss_scaling:
                trainer.model_accepts_loss_kwargs = False
                logger.warning("prune_callbacks: set trainer.model_accepts_loss_kwargs = False: %s", problem)
            else:
                logger.warning("prune_callbacks: %s. Set trainer.model_accepts_loss_kwargs = False after building "
                               "the Trainer (fix_loss_scaling=True does it for you).", problem)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.dense.before_start(self.trainer, state)  # before any compute
        started = self.engine.start(args, state, model, optimizer)  # validates the config before any compute
        if started:
            self._check_loss_scaling(args, model)
        self.dense.after_start(self.engine, self.trainer, control)

    def on_step_end(self, args, state, control, **kwargs):
        self.dense.at_step_end(self.engine.pruner, self.trainer, control)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or self.engine.pruner is None:
            return
        figures = self.engine.figures(self.log_per_group)
        if "dense_step" not in logs and any(k.startswith("dense_") for k in logs):
            figures = {"dense_step": state.global_step, **figures}  # when the dense baseline was measured
        add_figures(state, logs, figures)
        reporters = [args.report_to] if isinstance(args.report_to, str) else list(args.report_to or [])
        if self.trainer is None and any(r != "none" for r in reporters) and not self._warned_unbound:
            self._warned_unbound = True
            logger.warning(
                "prune_callbacks: the callbacks are not bound to their Trainer, so reporting callbacks (%s) run "
                "before them and miss the sparsity figures (log_history has them). Call callbacks.bind(trainer).",
                reporters,
            )

    def on_save(self, args, state, control, **kwargs):
        self.engine.save(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        self.engine.stop(args, state)


class L1RegularizationCallback(_TrainerPruningCallback):
    """Proximal L1 on the targeted weights after every optimizer step (see `prune_callbacks.methods.regularization`).

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
            # L1Config(...) raises PruningConfigError itself ("invalid L1Config: <field>: ...")
            config = L1Config(l1_lambda=l1_lambda, l1_ramp_steps=l1_ramp_steps, include=include, exclude=list(exclude))
            engine = TrainerPruningEngine(config, resume_from=resume_from)
        super().__init__(engine)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.drives:
            self.engine.start(args, state, model, optimizer)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.engine.pruner is not None:
            add_figures(state, logs, self.engine.l1_figures())

    def on_save(self, args, state, control, **kwargs):
        if self.drives:
            self.engine.save(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        if self.drives:
            self.engine.stop(args, state)


class PermanentMaskCallback(_TrainerPruningCallback):
    """At train end: masks made permanent (pruned weights are +0.0, hooks and buffers released).

    ``PermanentMaskCallback(*, save_sparse_to=None)``. On its own it finalizes whichever
    prune_callbacks engine prunes the Trainer's model. After ``load_best_model_at_end`` the run's
    final masks are applied to the reloaded weights first. ``save_sparse_to``: also write a
    compressed sparse checkpoint there (`prune_callbacks.export.sparse_io.save_sparse`, with the
    Trainer's tokenizer / processor) from the saving process. ``slim``: export the compact form in
    place (`prune_callbacks.integrations.exporting.export_model`, each granularity's ``export_as``):
    removed structured units are cut out and the config rewritten, so ``trainer.save_model`` writes a
    smaller model that plain ``from_pretrained`` loads; ``low_rank`` Linears are factorised into two
    thin Linears, which ``from_pretrained`` cannot rebuild: save that model with
    ``prune_callbacks.export.low_rank.save_low_rank(trainer.model, out, tokenizer)`` (``load_low_rank``
    reads it back); ``trainer.save_model`` and ``save_sparse_to`` refuse it with that advice.
    Refused (``ValueError``) at train end: ``slim`` with no granularity that has a compact form.
    """

    def __init__(self, *, save_sparse_to: Optional[Union[str, os.PathLike]] = None,
                 engine: Optional[TrainerPruningEngine] = None, slim: bool = False):
        super().__init__(engine)
        self.save_sparse_to = save_sparse_to
        self.slim = slim

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        engine = self.engine if self.engine is not None and self.engine.pruner is not None else engine_for(model)
        if engine is None:
            logger.warning("prune_callbacks: PermanentMaskCallback found no pruning engine on this model; nothing to finalize")
        else:
            engine.finish(args, state)
            if self.slim:
                from prune_callbacks.integrations.exporting import export_model

                export_model(model, engine.pruner)
        if self.save_sparse_to is not None and args.should_save:
            from prune_callbacks.export.sparse_io import save_sparse

            from prune_callbacks.integrations.exporting import factorised_save_problem

            problem = factorised_save_problem(model)
            if problem is not None:
                raise ValueError(f"save_sparse_to={str(self.save_sparse_to)!r}: {problem}")

            save_sparse(model, self.save_sparse_to, tokenizer=processing_class)


class PruningStateRecord(TrainerCallback, ExportableState):
    """Keeps, in each checkpoint's ``trainer_state.json``, where that checkpoint's pruning state file is.

    Part of every `make_callbacks` set; it has no effect on training. The Trainer restores the
    record with the TrainerState of the folder it resumes from, which is how resume finds the state
    in any folder, and tells a dense checkpoint (no record) from one whose state was lost (see
    :mod:`.checkpoint`). With ``restore_callback_states_from_checkpoint=True`` the Trainer replaces
    this callback by a fresh instance; that one finds the engine through the model at train begin.
    """

    def __init__(self, engine: Optional[TrainerPruningEngine] = None):
        self.engine = engine
        self.record: Optional[dict] = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.engine is None:
            self.engine = engine_for(model)

    def state(self) -> dict:
        current = self.engine.record() if self.engine is not None else None
        return ckpt.exported_state(current if current is not None else self.record)


def make_callbacks(config: ConfigLike = None, *, evaluate_dense: DenseTiming = False, finalize: bool = True,
                   save_sparse_to: Optional[Union[str, os.PathLike]] = None, log_per_group: bool = True,
                   resume_from: Optional[str] = None, fix_loss_scaling: bool = True, distillation=None,
                   slim: bool = False, **overrides) -> PruningCallbacks:
    """The callbacks sharing one pruning engine: ``GradualPruningCallback``, ``L1RegularizationCallback``
    (when ``l1_lambda > 0``), ``PermanentMaskCallback`` (unless ``finalize=False``) and
    ``PruningStateRecord``.

    ``config``: a `PruningConfig`, a dict, a list of them (several configs in one run, passed to
    ``Pruner(model, [...])``), a path to a YAML file (a recipe's ``pruning:`` section, or a bare
    mapping; read like ``prune-callbacks validate`` reads it), or None for the defaults;
    ``overrides`` are PruningConfig fields (one config only).
    ``evaluate_dense``: False, True / ``"train_begin"`` or ``"before_pruning"`` (see `GradualPruningCallback`).
    ``distillation``: a `DistillationConfig` or dict adds a ``DistillationCallback`` sharing the engine
    (see `prune_callbacks.integrations.trainer.distillation`).
    """
    engine = TrainerPruningEngine(make_configs(config, overrides), resume_from=resume_from)
    callbacks: list = [GradualPruningCallback(engine=engine, evaluate_dense=evaluate_dense, log_per_group=log_per_group,
                                              fix_loss_scaling=fix_loss_scaling)]
    if any(getattr(c, "accuracy_guard", None) is not None for c in engine.configs):
        from prune_callbacks.integrations.trainer.guard import AccuracyGuardCallback  # before PermanentMaskCallback: its final check runs unfinalized

        callbacks.append(AccuracyGuardCallback(engine))
    if any(c.l1_lambda > 0 for c in engine.configs):
        callbacks.append(L1RegularizationCallback(engine=engine))
    if finalize:
        callbacks.append(PermanentMaskCallback(engine=engine, save_sparse_to=save_sparse_to, slim=slim))
    callbacks.append(PruningStateRecord(engine))
    if distillation is not None:  # distillation from a dense teacher (issue 12)
        from prune_callbacks.integrations.trainer.distillation import DistillationCallback

        callbacks.append(DistillationCallback(distillation, engine=engine, resume_from=resume_from))
    return PruningCallbacks(callbacks, engine)
