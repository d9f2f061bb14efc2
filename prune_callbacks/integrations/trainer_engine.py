"""`TrainerPruningEngine`: one `Pruner`'s life across ``Trainer.train()`` calls.

The Trainer callbacks of one set (:func:`~prune_callbacks.integrations.trainer.make_callbacks`)
share one engine. It builds the `Pruner` at train begin (when the model, the
optimizer and ``state.max_steps`` are known), restores it from the checkpoint
a run resumes from, writes its state into every ``checkpoint-N/`` folder,
turns its report into log figures, and finalizes it. No ``transformers``
import here: the engine only reads ``args`` / ``state`` attributes.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any, Optional

import torch
from torch import nn

from ..config import PruningConfig, PruningConfigError
from ..pruner import Pruner
from ..schedule import is_update_step, l1_strength
from ..state_io import STATE_FILE, load_state_file, save_state_file
from ..targets import unwrap_model

logger = logging.getLogger(__name__)

# id(bare model) -> the engine pruning it, so a PermanentMaskCallback used on its own finds it and two
# engines never hook the same model. Weak values: an engine lives as long as its callbacks do.
_ENGINES: "weakref.WeakValueDictionary[int, TrainerPruningEngine]" = weakref.WeakValueDictionary()


def engine_for(model: nn.Module) -> Optional["TrainerPruningEngine"]:
    """The engine whose pruner prunes ``model`` (or its unwrapped module), if any."""
    bare = unwrap_model(model)
    engine = _ENGINES.get(id(bare))
    return engine if engine is not None and engine.pruner is not None and engine.pruner.model is bare else None


def checkpoint_dir(args: Any, state: Any) -> str:
    """The folder ``Trainer._save_checkpoint`` writes at this step (no hyper-parameter search)."""
    return os.path.join(args.output_dir, f"checkpoint-{state.global_step}")


class TrainerPruningEngine:
    """Owns the `Pruner` of one callback set; every method is safe to call from several callbacks."""

    def __init__(self, config: PruningConfig, *, resume_from: Optional[str] = None):
        self.config = config
        self.resume_from = resume_from
        self.pruner: Optional[Pruner] = None
        self.resumed_from: Optional[str] = None  # state file the current run was restored from
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
        self.resumed_from = None
        if state.global_step > 0:
            self._restore(pruner, args, state)
        pruner.attach(optimizer)
        self.pruner, self._state = pruner, state
        _ENGINES[id(bare)] = self
        return True

    def first_update_step(self) -> int:
        """The optimizer step (1-based) whose optimizer post-hook computes the first masks; the model is
        dense until then. ``start_step`` when it is >= 1; for ``start_step=0`` the first multiple of
        ``update_every`` (or ``end_step``); with ``oneshot``, ``max(start_step, 1)``."""
        if self.pruner is None:
            raise RuntimeError("the pruner is built at train begin")
        s, c = self.pruner.steps, self.config
        first = max(s.start_step, 1)
        for step in range(first, max(s.end_step, first) + 1):  # the last step is always an update step
            if is_update_step(step, start=s.start_step, end=s.end_step, every=c.update_every, kind=c.schedule):
                return step
        return first

    @property
    def attached(self) -> bool:
        return self.pruner is not None and bool(self.pruner._hooks)

    def stop(self) -> None:
        """Detach the pruner's hooks (the masks stay applied)."""
        if self.pruner is not None:
            self.pruner.detach()
        self._state = None

    @torch.no_grad()
    def finish(self, args: Any, state: Any) -> None:
        """Make the masks permanent. With ``load_best_model_at_end`` the Trainer has just loaded the best
        checkpoint's (masked) weights: its masks are restored first so finalize does not add later zeros."""
        if self.pruner is None or self.pruner.finalized:
            return
        best = state.best_model_checkpoint if getattr(args, "load_best_model_at_end", False) else None
        if best and os.path.isfile(os.path.join(best, STATE_FILE)):
            self.pruner.load_state_dict(load_state_file(os.path.join(best, STATE_FILE)))
        self.pruner.finalize()
        self._state = None

    # ------------------------------------------------------------ checkpoints
    def save(self, args: Any, state: Any) -> Optional[str]:
        """Write the pruning state into this step's checkpoint folder (the process that saves only)."""
        if self.pruner is None or self.pruner.finalized or not args.should_save:
            return None
        folder = checkpoint_dir(args, state)
        if not os.path.isdir(folder):
            logger.warning("prune_callbacks: checkpoint folder %s not found; pruning state not saved", folder)
            return None
        payload = self.pruner.state_dict()
        payload.update(global_step=int(state.global_step), total_steps=int(state.max_steps))
        return str(save_state_file(payload, os.path.join(folder, STATE_FILE)))

    def _restore(self, pruner: Pruner, args: Any, state: Any) -> None:
        # Trainer.train(resume_from_checkpoint=...) does not record the path in args; the restored
        # TrainerState's global_step names the folder (checkpoint-N) it came from.
        candidates = [self.resume_from, getattr(args, "resume_from_checkpoint", None), checkpoint_dir(args, state)]
        tried = []
        for candidate in dict.fromkeys(c for c in candidates if isinstance(c, (str, os.PathLike))):
            path = str(candidate)
            path = path if path.endswith(".safetensors") else os.path.join(path, STATE_FILE)
            if not os.path.isfile(path):
                tried.append(f"{path} (missing)")
                continue
            saved = load_state_file(path, device=pruner.params[0].device)
            step = saved.get("global_step")
            if step is not None and int(step) != state.global_step:
                tried.append(f"{path} (written at step {step})")
                continue
            self._check_compatible(saved, state, path)
            pruner.load_state_dict(saved)
            self.resumed_from = path
            logger.info("prune_callbacks: resumed pruning state from %s (step %s)", path, pruner.step)
            return
        raise RuntimeError(
            f"the Trainer resumes at global step {state.global_step} but no pruning state for that step was found; "
            f"tried: {'; '.join(tried)}. Pass resume_from=<checkpoint folder> to make_callbacks / "
            "GradualPruningCallback, or start the run from scratch"
        )

    def _check_compatible(self, saved: dict, state: Any, path: str) -> None:
        old = saved.get("config", {})
        if old.get("saliency") != self.config.saliency:
            raise PruningConfigError(
                f"{path} was written with saliency={old.get('saliency')!r} but the config says "
                f"saliency={self.config.saliency!r}: its buffers cannot be resumed"
            )
        new = self.config.model_dump(mode="json")
        changed = sorted(k for k in new if k in old and old[k] != new[k])
        if changed:
            logger.warning("prune_callbacks: resuming with changed config fields: %s", ", ".join(changed))
        total = saved.get("total_steps")
        if total is not None and int(total) != state.max_steps and self.config.uses_fractions():
            logger.warning(
                "prune_callbacks: the checkpoint was written by a run of %s steps, this one has %s: fractional "
                "schedule steps resolve differently", total, state.max_steps,
            )

    # ------------------------------------------------------------ logging
    def figures(self, per_group: bool = True) -> dict[str, float]:
        """``sparsity/global`` (pruned fraction of the targets), ``sparsity/target`` (the schedule's value
        now) and, with ``per_group``, ``sparsity/<layer kind>`` over the repeated blocks."""
        if self.pruner is None:
            return {}
        report = self.pruner.report()
        out = {"sparsity/global": float(report["global_sparsity"]), "sparsity/target": float(report["scheduled_sparsity"])}
        if per_group:
            for name, row in _short_group_names(report["per_group"]).items():
                out[f"sparsity/{name}"] = float(row["sparsity"])
        return out

    @torch.no_grad()
    def l1_figures(self) -> dict[str, float]:
        """``l1/strength`` (current lambda of the proximal step) and ``l1/zero_fraction`` (exact zeros
        among the targeted weights, masked or not)."""
        if self.pruner is None:
            return {}
        p = self.pruner
        strength = 0.0 if p.finalized else l1_strength(p.step, l1_lambda=p.config.l1_lambda, ramp_steps=p.steps.l1_ramp_steps)
        zeros = sum(w.numel() - int(torch.count_nonzero(w)) for w in p.params)
        total = sum(w.numel() for w in p.params)
        return {"l1/strength": float(strength), "l1/zero_fraction": zeros / total if total else 0.0}


def _short_group_names(per_group: dict) -> dict:
    """``bert.encoder.layer.*.attention.self.query`` -> ``attention.self.query`` (full name on clashes)."""
    short = {g: g.rsplit(".*.", 1)[-1] for g in per_group}
    counts: dict[str, int] = {}
    for s in short.values():
        counts[s] = counts.get(s, 0) + 1
    return {(short[g] if counts[short[g]] == 1 else g): row for g, row in per_group.items()}
