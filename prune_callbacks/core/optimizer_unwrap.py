"""The torch optimizer inside a wrapper: where the pruner's (and the Accelerate hooks') step hooks go.

Accelerate's ``AcceleratedOptimizer`` and similar wrappers keep the real ``torch.optim.Optimizer``
in ``.optimizer``; step hooks registered on the *inner* one fire only on real steps (not on
gradient-accumulation micro-steps, not on steps a ``GradScaler`` skips).
"""

from __future__ import annotations

from typing import Any

import torch


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The innermost ``torch.optim.Optimizer`` (Accelerate and others wrap it in ``.optimizer``)."""
    # AcceleratedOptimizer *subclasses* torch.optim.Optimizer (without calling its __init__),
    # so unwrap while ``.optimizer`` leads further in, not only while the type is foreign.
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer or not (isinstance(inner, torch.optim.Optimizer) or hasattr(inner, "optimizer")):
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"attach() needs a torch.optim.Optimizer (or a wrapper exposing .optimizer); got {type(optimizer).__name__}")
    return optimizer
