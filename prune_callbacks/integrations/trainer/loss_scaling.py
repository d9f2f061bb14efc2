"""The loss-scaling trap of ``model_accepts_loss_kwargs`` (transformers 5.x), detected and fixed.

The Trainer sets ``trainer.model_accepts_loss_kwargs`` when the model's
``forward`` takes ``**kwargs``, and then neither divides the loss by
``gradient_accumulation_steps`` nor keeps it a mean over processes (it
multiplies by the number of processes), trusting the model to normalise with
``num_items_in_batch``. Models that compute their loss with ``self.loss_function``
(causal LMs) do; BERT-like classifiers take ``**kwargs`` and ignore it: under
gradient accumulation or DDP they train on a loss (and gradients, clipping,
saliency) that is too large by that factor.

`loss_scaling_problem` says when that is the case; with the Trainer bound, the
callbacks set ``trainer.model_accepts_loss_kwargs = False`` at train begin and
log a warning naming the setting (``fix_loss_scaling=False``: only warn).
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

from prune_callbacks.core.targets import unwrap_model


def accepts_loss_kwargs(model: Any) -> bool:
    """What the Trainer decides for ``model_accepts_loss_kwargs`` (its own rule)."""
    if hasattr(model, "accepts_loss_kwargs"):
        return bool(model.accepts_loss_kwargs)
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)


def normalises_loss_itself(model: Any) -> bool:
    """Whether the model's ``forward`` hands ``num_items_in_batch`` on to a loss function."""
    forward = getattr(type(model), "forward", None)
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):
        return True  # unknown: do not claim a problem
    return "loss_function" in source or "num_items_in_batch" in source


def loss_scaling_problem(model: Any, args: Any) -> Optional[str]:
    """Why the Trainer would train ``model`` with a mis-scaled loss under ``args``, or None."""
    bare = unwrap_model(model)
    if not accepts_loss_kwargs(bare) or normalises_loss_itself(bare):
        return None
    why = []
    accumulation = int(getattr(args, "gradient_accumulation_steps", 1) or 1)
    world = int(getattr(args, "world_size", 1) or 1)
    if accumulation > 1:
        why.append(f"gradient_accumulation_steps={accumulation}")
    if world > 1:
        why.append(f"{world} processes")
    if not why:
        return None
    return (f"{type(bare).__name__}.forward accepts **kwargs but ignores num_items_in_batch; with "
            f"{' and '.join(why)} the Trainer would not average its loss (gradients about "
            f"{accumulation * world}x too large)")
