"""The callbacks and their Trainer: the shared callback base and the set's ``bind(trainer)``.

The Trainer hands callbacks no reference to itself; ``callbacks.bind(trainer)`` gives it to every
callback of a `make_callbacks` set (adding them to the Trainer if they are not there yet), kept
weakly, and moves them right after ``DefaultFlowCallback`` so reporters see the figures
(:func:`.logs.put_before_reporters`).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Optional

from transformers import Trainer, TrainerCallback

from prune_callbacks.integrations.trainer.logs import put_before_reporters

if TYPE_CHECKING:
    from prune_callbacks.integrations.trainer.engine import TrainerPruningEngine


class _TrainerPruningCallback(TrainerCallback):
    """Shared plumbing: the engine and the Trainer the callback was bound to (weakly)."""

    def __init__(self, engine: Optional["TrainerPruningEngine"]):
        self.engine = engine
        self._trainer_ref: Optional[weakref.ref] = None

    @property
    def trainer(self) -> Optional[Trainer]:
        return self._trainer_ref() if self._trainer_ref is not None else None

    def bind(self, trainer: Trainer) -> "_TrainerPruningCallback":
        """Tell the callback its Trainer (reporters' order, dense evaluation, loss-scaling fix)."""
        self._trainer_ref = weakref.ref(trainer)
        put_before_reporters(trainer, _TrainerPruningCallback)
        return self


class PruningCallbacks(list):
    """The callbacks of `make_callbacks` (a list, so ``callbacks=make_callbacks(...)`` just works)."""

    def __init__(self, callbacks, engine):
        super().__init__(callbacks)
        self.engine = engine

    @property
    def pruner(self):
        """The running `Pruner` (None before ``train()``): ``report()``, ``state_dict()``, ..."""
        return self.engine.pruner

    @property
    def guard(self):
        """The `AccuracyGuardCallback` of the set (None without ``accuracy_guard``): ``guard.report()``."""
        return next((cb for cb in self if type(cb).__name__ == "AccuracyGuardCallback"), None)

    def bind(self, trainer: Trainer) -> "PruningCallbacks":
        """Give the callbacks their Trainer (adding them to it if they are not there yet), and run them
        right after ``DefaultFlowCallback`` so reporters see the figures. Returns self."""
        present = {id(cb) for cb in trainer.callback_handler.callbacks}
        for cb in self:
            if id(cb) not in present:
                trainer.add_callback(cb)
        for cb in self:
            if isinstance(cb, _TrainerPruningCallback) or callable(getattr(cb, "bind", None)):
                cb.bind(trainer)
        return self
