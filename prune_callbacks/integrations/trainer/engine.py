"""`TrainerPruningEngine`: one `Pruner`'s life across ``Trainer.train()`` calls.

The Trainer callbacks of one set (:func:`~prune_callbacks.integrations.trainer.make_callbacks`)
share one engine. It builds the `Pruner` at train begin (when the model, the
optimizer and ``state.max_steps`` are known), restores it from the checkpoint a
run resumes from (:mod:`.checkpoint`), writes its state into every
``checkpoint-N/`` folder, turns its report into log figures
(:mod:`prune_callbacks.core.figures`), and finalizes it -- after a best-model reload
too, so the model the run ends with carries the final masks. No ``transformers``
import here: the engine only reads ``args`` / ``state`` attributes.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any, Optional

import torch
from torch import nn

from prune_callbacks.core import figures as F
from prune_callbacks.core.config import PruningConfigError
from prune_callbacks.engine.pruner import Pruner
from prune_callbacks.core.state_io import STATE_FILE, load_state_file
from prune_callbacks.core.targets import unwrap_model
from prune_callbacks.integrations.trainer import checkpoint as ckpt
from prune_callbacks.integrations.configs import Configs, as_list

logger = logging.getLogger(__name__)

# id(bare model) -> the engine pruning it, so a PermanentMaskCallback used on its own finds it and two
# engines never hook the same model. Weak values: an engine lives as long as its callbacks do.
_ENGINES: "weakref.WeakValueDictionary[int, TrainerPruningEngine]" = weakref.WeakValueDictionary()


def engine_for(model: Optional[nn.Module]) -> Optional["TrainerPruningEngine"]:
    """The engine whose pruner prunes ``model`` (or its unwrapped module), if any."""
    if model is None:
        return None
    bare = unwrap_model(model)
    engine = _ENGINES.get(id(bare))
    return engine if engine is not None and engine.pruner is not None and engine.pruner.model is bare else None


class TrainerPruningEngine:
    """Owns the `Pruner` of one callback set; every method is safe to call from several callbacks.

    ``config``: one `PruningConfig` or a list of them (several configs in one run: the list goes
    to ``Pruner(model, [...])`` as it is).
    """

    def __init__(self, config: Configs, *, resume_from: Optional[str] = None):
        self.config = config
        self.configs = as_list(config)
        self.resume_from = resume_from
        self.pruner: Optional[Pruner] = None
        self.resumed_from: Optional[str] = None  # state file the current run was restored from
        self.started_fresh_at: Optional[int] = None  # global step a dense checkpoint was resumed at
        self._args = None
        self._best_checked = None  # (TrainerState id, best checkpoint) already handled
        self._state = None  # the TrainerState of the train() call the pruner is attached for

    # ------------------------------------------------------------ train begin / end
    def start(self, args: Any, state: Any, model: Optional[nn.Module], optimizer: Any) -> bool:
        """Build, restore (on resume) and attach the pruner for this ``train()`` call.

        Returns False when it was already started for this call. Raises before
        any compute when the config cannot work with this model or run.
        """
        if self._state is state and self.pruner is not None:
            return False
        if model is None or optimizer is None:
            raise RuntimeError(
                "prune_callbacks: the Trainer passed no model/optimizer at on_train_begin; "
                "these callbacks need a stock transformers.Trainer (DeepSpeed and FSDP are not supported)"
            )
        bare = unwrap_model(model)
        other = engine_for(bare)
        if other is not None and other is not self and other.attached:
            raise RuntimeError(
                "two prune_callbacks engines would prune the same model: put every option in one "
                "PruningConfig and use make_callbacks(config) (e.g. l1_lambda=... instead of a separate "
                "L1RegularizationCallback)"
            )
        try:
            pruner = Pruner(bare, self.config, total_steps=state.max_steps)
        except PruningConfigError as exc:
            raise PruningConfigError(f"pruning config does not fit this Trainer run (max_steps={state.max_steps}): {exc}") from None
        except ValueError as exc:  # target patterns that match nothing, tied weights, ...
            raise PruningConfigError(f"pruning config does not fit this model: {exc}") from None
        if pruner.sharded:
            raise NotImplementedError(
                "prune_callbacks: the Trainer's fsdp arguments (Accelerate's FSDP plugin) are not supported: the model's "
                "weights are FSDP2 shards, and the Trainer callbacks' logging, checkpoints and export read whole "
                "weights on rank 0. It is not wired and cannot be tested on CPU: Accelerate 1.16 enables its FSDP "
                "plugin only for GPU-type backends (accelerate/state.py: never for MULTI_CPU). Train with DDP (no fsdp "
                "arguments), or shard with torch.distributed.fsdp.fully_shard in a plain torch or Accelerate loop "
                "(docs/sharded-training.md)"
            )
        self.resumed_from = self.started_fresh_at = None
        if state.global_step > 0:
            self._restore(pruner, args, state)
        pruner.attach(optimizer)
        self.pruner, self._args, self._state = pruner, args, state
        ckpt.ensure_record_slot(state, ckpt.exported_state(self.record()))
        _ENGINES[id(bare)] = self
        return True

    def first_update_step(self) -> Optional[int]:
        """The optimizer step (1-based) whose optimizer post-hook computes the first masks; the model is
        dense until then (`Pruner.first_update_step`; None when nothing is pruned, L1 only)."""
        if self.pruner is None:
            raise RuntimeError("the pruner is built at train begin")
        return self.pruner.first_update_step()

    @property
    def attached(self) -> bool:
        return self.pruner is not None and bool(self.pruner._hooks)

    def stop(self, args: Any = None, state: Any = None) -> None:
        """End of a ``train()`` call: detach the pruner's hooks (the masks stay applied); after a
        best-model reload, apply the run's final masks to the reloaded weights (see `finish`)."""
        if self.pruner is not None:
            self.pruner.detach()
            if args is not None and state is not None:
                self._check_best_model(args, state)
        self._state = None

    @torch.no_grad()
    def finish(self, args: Any, state: Any) -> None:
        """Make the masks permanent.

        With ``load_best_model_at_end`` the Trainer has just loaded the best checkpoint's weights,
        which may come from before the final sparsity (an early, lightly pruned checkpoint). The
        run's final masks are applied to them, so the model the run ends with -- and saves -- is
        pruned as asked and the figures (`Pruner.report`, the last ``sparsity/*`` logs) describe it;
        a warning names the checkpoint and both sparsities (its metrics were measured before).
        """
        pruner = self.pruner
        if pruner is None or pruner.finalized:
            return
        self._check_best_model(args, state)
        pruner.finalize()
        self._state = None

    def _check_best_model(self, args: Any, state: Any) -> None:
        best = state.best_model_checkpoint if getattr(args, "load_best_model_at_end", False) else None
        if best and self._best_checked != (id(state), best) and not self.pruner.finalized:
            self._best_checked = (id(state), best)
            self._after_best_model_reload(best)

    def _after_best_model_reload(self, best: str) -> None:
        pruner = self.pruner
        path = os.path.join(best, STATE_FILE)
        best_sparsity = None
        if os.path.isfile(path):
            best_sparsity = F.mask_sparsity_of(load_state_file(path))
        pruner.apply_masks()  # the best weights carry the final masks from here on
        final = F.mask_sparsity_of(pruner.report())
        if best_sparsity is not None and best_sparsity < final:
            logger.warning(
                "prune_callbacks: load_best_model_at_end loaded %s, saved when its masks were at sparsity %.4f; the "
                "run's final masks (sparsity %.4f) were applied to those weights, so the model is pruned as asked. "
                "Its eval metrics were measured at %.4f: evaluate again (trainer.evaluate()) for this model's "
                "figures, or evaluate only after the schedule's end_step so the best checkpoint is a final one.",
                best, best_sparsity, final, best_sparsity,
            )

    # ------------------------------------------------------------ checkpoints
    def record(self) -> Optional[dict]:
        """What `PruningStateRecord` writes into ``trainer_state.json`` at a save happening now."""
        if self._args is None or self._state is None:
            return None
        writes = self.pruner is not None and not self.pruner.finalized and bool(self._args.should_save)
        return ckpt.record_for(self._args, self._state, writes)

    def save(self, args: Any, state: Any) -> Optional[str]:
        """Write the pruning state into this step's checkpoint folder (the process that saves only)."""
        return ckpt.save_state(self.pruner, args, state)

    def _restore(self, pruner: Pruner, args: Any, state: Any) -> None:
        record = ckpt.restored_record(state)
        candidates = [self.resume_from, getattr(args, "resume_from_checkpoint", None),
                      (record or {}).get("state_file"), ckpt.checkpoint_dir(args, state)]
        path, saved, tried = ckpt.find_state(candidates, state.global_step, device=pruner.params[0].device)
        if saved is not None:
            self._check_compatible(pruner, saved, state, path)
            pruner.load_state_dict(saved)
            self.resumed_from = path
            recorded = (record or {}).get("state_file")
            outside = not os.path.abspath(path).startswith(os.path.abspath(args.output_dir) + os.sep)
            if path == recorded and path not in (self.resume_from, getattr(args, "resume_from_checkpoint", None)) \
                    and outside:
                logger.warning("prune_callbacks: resumed pruning state from %s (step %s), the file recorded in the "
                               "checkpoint's trainer_state.json by the run that wrote it, outside this run's output_dir "
                               "%s; pass resume_from=<checkpoint folder or state file> to make_callbacks to read "
                               "another one", path, pruner.step, args.output_dir)
            else:
                logger.info("prune_callbacks: resumed pruning state from %s (step %s)", path, pruner.step)
            return
        hint = ("Pass resume_from=<the checkpoint folder, or its pruning_state.safetensors> to make_callbacks / "
                "GradualPruningCallback if the file was moved, or start the run from scratch")
        if record is not None and record.get("state_file"):
            raise RuntimeError(
                f"the Trainer resumes at global step {state.global_step} from a checkpoint whose run wrote a pruning "
                f"state to {record['state_file']}, but no pruning state for that step was found; tried: "
                f"{'; '.join(tried)}. {hint}"
            )
        pruned = ckpt.looks_pruned(pruner.params)
        if pruned is not None:
            raise RuntimeError(
                f"the Trainer resumes at global step {state.global_step} from a checkpoint without a pruning state, "
                f"but the loaded model was pruned before: {pruned}. tried: {'; '.join(tried)}. {hint}"
            )
        self._start_fresh(pruner, state)

    def _start_fresh(self, pruner: Pruner, state: Any) -> None:
        """A dense checkpoint (its run had no pruning callbacks): prune from this step on."""
        step = int(state.global_step)
        # the schedules count the Trainer's optimizer steps (as Pruner.load_state_dict sets them)
        pruner.step = step
        for component in pruner.l1:
            component.step = step
        nxt = self._next_update_step(pruner)
        if nxt is None and pruner.groups:
            raise PruningConfigError(
                f"the run resumes a dense checkpoint at global step {step}, but the pruning schedule's last "
                "mask update is not after it, so nothing would be pruned: set start_step / end_step after "
                f"step {step} (max_steps={state.max_steps})"
            )
        self.started_fresh_at = step
        logger.warning(
            "prune_callbacks: the checkpoint at global step %d holds no pruning state (written by a run without "
            "these callbacks): pruning starts fresh from this step%s", step,
            f"; first mask update at step {nxt} (scheduled sparsity there {pruner.scheduled_sparsity(nxt):.4f})"
            if nxt is not None else "",
        )

    @staticmethod
    def _next_update_step(pruner: Pruner) -> Optional[int]:
        """The first step after the current one at which some group's schedule updates masks."""
        later = [s for g in pruner.groups for s in g.schedule.update_steps() if s > pruner.step]
        return min(later, default=None)

    def _check_compatible(self, pruner: Pruner, saved: dict, state: Any, path: str) -> None:
        """Pruner.load_state_dict refuses what cannot be resumed; here only the run-length warning."""
        total = saved.get("total_steps")
        fractional = any(getattr(c, "uses_fractions", lambda: False)() for c in self.configs)
        if total is not None and int(total) != state.max_steps and fractional:
            logger.warning(
                "prune_callbacks: the checkpoint was written by a run of %s steps, this one has %s: fractional "
                "schedule steps resolve differently", total, state.max_steps,
            )

    # ------------------------------------------------------------ logging
    def figures(self, per_group: bool = True) -> dict:
        """The ``sparsity/*`` and ``pruning/*`` figures (:mod:`prune_callbacks.core.figures`)."""
        if self.pruner is None:
            return {}
        return F.sparsity_figures(self.pruner.report(), per_group=per_group)

    def l1_figures(self) -> dict:
        """``l1/strength`` and ``l1/zero_fraction`` (:mod:`prune_callbacks.core.figures`)."""
        if self.pruner is None:
            return {}
        return F.l1_figures(self.pruner.report())
