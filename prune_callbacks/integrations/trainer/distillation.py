"""`DistillationCallback`: knowledge distillation from a dense teacher inside a stock ``transformers.Trainer``.

::

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=make_callbacks(PruningConfig(final_sparsity=0.9),
                                               distillation=DistillationConfig(hardness=1.0)))
    trainer.train()

No Trainer subclass and no extra user line: at ``on_train_begin`` the callback
attaches a `prune_callbacks.controllers.distillation.Distiller` to the model, which patches the
model's ``forward`` on the instance; ``Trainer.compute_loss`` reads
``outputs["loss"]``, which then already is ``hardness * KD + (1 - hardness) * task
loss``. The patch is undone at ``on_train_end``. Verified against transformers 5.24:

* Gradient accumulation: the Trainer divides the returned loss by the accumulation
  steps unless the model normalised it over ``num_items_in_batch`` (causal LMs); the
  KD term of token-level logits uses the same ``num_items_in_batch`` divisor, so both
  terms are scaled alike. (BERT-like heads: set ``trainer.model_accepts_loss_kwargs =
  False``, as for pruning.)
* bf16 / fp16: Accelerate's autocast wrapper of ``forward`` is kept and called for the
  student; the teacher runs in its own dtype (``teacher_dtype``) and the KL is
  computed in float32.
* DDP: ``DistributedDataParallel`` calls the patched forward; every process holds
  its own frozen teacher, outside DDP and the optimizer.
* Teacher ``"self"``: copied at ``on_train_begin`` (``snapshot="train_begin"``) or
  at ``on_step_end`` of the last optimizer step before the pruner's first mask update
  (``"before_pruning"``, the step `TrainerPruningEngine.first_update_step` names).
  ``on_save`` writes it to ``checkpoint-N/distillation_teacher.safetensors``; a resumed
  run restores it from there bit for bit instead of copying the (pruned) model again.
* A path or module teacher is loaded and checked (vocabulary, number of labels) at
  ``on_train_begin``, before any compute; a path that does not exist is rejected
  when the config is built.
* Logs: ``distill/kd_loss``, ``distill/task_loss`` (and ``distill/hidden_loss``) at
  every logging step: means over the training forward passes since the last log, of
  the logging process. Not supported: ``label_smoothing_factor`` / ``compute_loss_func``
  (the Trainer takes the labels away from the model and computes the loss itself).
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any, Optional, Union

from transformers import TrainerCallback

from prune_callbacks.controllers.distillation import DistillationConfig, Distiller, make_distillation_config
from prune_callbacks.controllers.distillation.config import DistillationConfigError
from prune_callbacks.controllers.distillation import teacher as teacher_lib
from prune_callbacks.controllers.distillation.teacher import TEACHER_FILE
from prune_callbacks.integrations.trainer.checkpoint import checkpoint_dir
from prune_callbacks.integrations.trainer.logs import add_figures as add_to_logs
from prune_callbacks.integrations.trainer.logs import put_before_reporters

__all__ = ["DistillationCallback"]

logger = logging.getLogger(__name__)

DistillationLike = Union[DistillationConfig, dict, None]


class DistillationCallback(TrainerCallback):
    """Distils the Trainer's model from a frozen teacher (see the module docstring).

    ``DistillationCallback(config | dict | None, *, engine=None, resume_from=None, **overrides)``.
    ``engine``: the `TrainerPruningEngine` of the pruning callbacks (``make_callbacks`` passes
    it); ``snapshot="before_pruning"`` needs it to know when the first mask update comes.
    ``resume_from``: the checkpoint folder a resumed run's teacher is read from (default: the
    engine's, else ``output_dir/checkpoint-<global_step>``). After ``callbacks.bind(trainer)`` it also
    refuses ``label_smoothing_factor`` / ``compute_loss_func`` at train begin (they bypass ``outputs.loss``).
    """

    def __init__(self, config: DistillationLike = None, *, engine: Any = None, resume_from: Optional[str] = None,
                 **overrides):
        self.config = make_distillation_config(config, **overrides)
        self.engine = engine
        self.resume_from = resume_from
        self.distiller = Distiller(self.config)
        self._snapshot_at: Optional[int] = None
        self._bound = False

    # ------------------------------------------------------------ the Trainer
    def bind(self, trainer) -> "DistillationCallback":
        """Tell the callback its Trainer (reporters' order, setup checks). Usually found automatically."""
        self._trainer_ref = weakref.ref(trainer)
        if not self._bound:
            self._bound = True
            put_before_reporters(trainer, DistillationCallback)  # reporters see distill/* in the same on_log
        return self

    def _bind(self) -> Any:
        ref = getattr(self, "_trainer_ref", None)
        trainer = ref() if ref is not None else None  # given by PruningCallbacks.bind(trainer) / bind()
        if trainer is not None:
            self.bind(trainer)
        return trainer

    def on_init_end(self, args, state, control, **kwargs):
        self._bind()

    def _check_trainer(self, trainer) -> None:
        if trainer is None:
            return
        if getattr(trainer, "label_smoother", None) is not None or getattr(trainer, "compute_loss_func", None):
            raise DistillationConfigError(
                "distillation does not work with label_smoothing_factor > 0 or compute_loss_func: the Trainer then "
                "takes the labels from the model and computes the loss itself. Set label_smoothing_factor=0 and no "
                "compute_loss_func (the distillation term replaces them)"
            )

    # ------------------------------------------------------------ train begin / end
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._check_trainer(self._bind())
        if model is None:
            raise RuntimeError("prune_callbacks: the Trainer passed no model at on_train_begin")
        cfg, d = self.config, self.distiller
        d.detach()
        self._snapshot_at = None
        if cfg.self_teacher and cfg.snapshot == "before_pruning":
            self._snapshot_at = self._snapshot_step(args, state, model, optimizer)
        if cfg.self_teacher and state.global_step > 0:
            d.teacher = None
            self._restore(args, state, model)
        elif cfg.self_teacher:
            d.teacher = None
        d.attach(model)  # loads / checks a path or module teacher, or copies a train_begin one
        if d.teacher is None and self._snapshot_at is not None and state.global_step >= self._snapshot_at:
            d.take_snapshot(state.global_step)
        if d.teacher is not None:
            logger.info("prune_callbacks: distillation teacher ready (%.1f MB)", d.teacher_bytes() / 2**20)

    def _snapshot_step(self, args, state, model, optimizer) -> int:
        engine = self.engine
        if engine is None:
            raise DistillationConfigError(
                "snapshot='before_pruning' needs the pruning callbacks (make_callbacks(config, distillation=...)): "
                "without pruning use snapshot='train_begin'"
            )
        engine.start(args, state, model, optimizer)  # no-op when the pruning callback already started it
        return teacher_lib.snapshot_step(engine)

    def _restore(self, args, state, model) -> None:
        folders = [self.resume_from, getattr(self.engine, "resume_from", None), checkpoint_dir(args, state)]
        tried = []
        for folder in dict.fromkeys(str(f) for f in folders if isinstance(f, (str, os.PathLike))):
            path = folder if folder.endswith(".safetensors") else os.path.join(folder, TEACHER_FILE)
            if os.path.isfile(path):
                self.distiller.restore(model, path)
                logger.info("prune_callbacks: distillation teacher restored from %s", path)
                return
            tried.append(path)
        if self._snapshot_at is not None and state.global_step < self._snapshot_at:
            return  # resumed before the snapshot: it is taken when the run gets there
        raise RuntimeError(
            f"the Trainer resumes at global step {state.global_step} but no distillation teacher was found "
            f"(tried {', '.join(tried)}); a 'self' teacher cannot be re-copied from the pruned model. "
            "Pass resume_from=<checkpoint folder>, or start the run from scratch"
        )

    def on_step_end(self, args, state, control, **kwargs):
        at = self._snapshot_at
        if at is not None and self.distiller.teacher is None and state.global_step >= at:
            self.distiller.take_snapshot(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None:
            add_to_logs(state, logs, self.distiller.figures())

    def on_save(self, args, state, control, **kwargs):
        d = self.distiller
        if not (self.config.self_teacher and d.teacher is not None and args.should_save):
            return
        folder = checkpoint_dir(args, state)
        if not os.path.isdir(folder):
            logger.warning("prune_callbacks: checkpoint folder %s not found; distillation teacher not saved", folder)
            return
        d.save(os.path.join(folder, TEACHER_FILE), global_step=int(state.global_step))

    def on_train_end(self, args, state, control, **kwargs):
        self.distiller.detach()
