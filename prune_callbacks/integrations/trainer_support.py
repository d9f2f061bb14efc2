"""Plumbing of the Trainer callbacks: config from a YAML path, the callback set, finding the Trainer, log figures."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, Union

from pydantic import ValidationError
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import DefaultFlowCallback

from ..config import PruningConfig, PruningConfigError, format_validation_error, make_config

ConfigLike = Union[PruningConfig, dict, str, os.PathLike, None]


# ---------------------------------------------------------------- config
def _config_from_path(path: Union[str, os.PathLike]) -> PruningConfig:
    """A YAML file: its top-level ``pruning:`` mapping, else the whole mapping, as a `PruningConfig`."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise PruningConfigError(f"pruning recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise PruningConfigError(f"{path}: not valid YAML: {exc}") from None
    section = ""
    if isinstance(data, dict) and "pruning" in data:
        data, section = data["pruning"], "pruning"
        if not isinstance(data, dict):
            raise PruningConfigError(f"{path}: the 'pruning:' section must be a mapping of PruningConfig fields")
    if not isinstance(data, dict):
        raise PruningConfigError(f"{path}: expected a mapping of PruningConfig fields (or a 'pruning:' section)")
    try:
        return PruningConfig.model_validate(data)
    except ValidationError as exc:
        raise PruningConfigError(f"invalid pruning config in {path}:\n{format_validation_error(exc, section)}") from None


def make_trainer_config(config: ConfigLike, overrides: dict) -> PruningConfig:
    if isinstance(config, (str, os.PathLike)):
        config = _config_from_path(config)
    return make_config(config, **overrides)


# ---------------------------------------------------------------- finding the Trainer
def trainer_on_stack(callback: TrainerCallback, depth: int = 12) -> Optional[Trainer]:
    """The Trainer whose callback handler is dispatching to ``callback`` (one of our callers' ``self``)."""
    frame = sys._getframe(1)
    try:
        for _ in range(depth):
            if frame is None:
                return None
            obj = frame.f_locals.get("self")
            if isinstance(obj, Trainer) and any(cb is callback for cb in obj.callback_handler.callbacks):
                return obj
            frame = frame.f_back
        return None
    finally:
        del frame


def put_before_reporters(trainer: Trainer, ours: type) -> None:
    """Reorder the handler's list: DefaultFlowCallback, the callbacks of type ``ours``, then the rest
    (reporting integrations, printer, user callbacks), each group in its own order."""
    handler = trainer.callback_handler
    mine = [cb for cb in handler.callbacks if isinstance(cb, ours)]
    rest = [cb for cb in handler.callbacks if not isinstance(cb, ours)]
    at = 1 + max((i for i, cb in enumerate(rest) if isinstance(cb, DefaultFlowCallback)), default=-1)
    order = rest[:at] + mine + rest[at:]
    if order != handler.callbacks:
        # A new list, not an in-place edit: the event being dispatched keeps iterating the old one.
        handler.callbacks = order


def add_to_logs(state, logs: dict, figures: dict) -> None:
    """Into the logs dict (callbacks after this one) and the ``log_history`` entry ``Trainer.log`` just
    appended (it copies the dict before ``on_log``)."""
    if not figures:
        return
    logs.update(figures)
    if state.log_history:
        entry = state.log_history[-1]
        if entry.get("step") == state.global_step:
            entry.update(figures)


# ---------------------------------------------------------------- the callback set
class PruningCallbacks(list):
    """The callbacks of `make_callbacks` (a list, so ``callbacks=make_callbacks(...)`` just works)."""

    def __init__(self, callbacks, engine):
        super().__init__(callbacks)
        self.engine = engine

    @property
    def pruner(self):
        """The running `Pruner` (None before ``train()``): ``report()``, ``state_dict()``, ..."""
        return self.engine.pruner

    def bind(self, trainer: Trainer) -> "PruningCallbacks":
        for cb in self:
            cb.bind(trainer)
        return self
