"""The proximal L1 step as a step component (see :mod:`prune_callbacks.methods.regularization` for why proximal)."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from prune_callbacks.methods.regularization import apply_l1_proximal
from prune_callbacks.core.report import zero_count
from prune_callbacks.methods.schedule import l1_strength
from prune_callbacks.core.targets import Target
from prune_callbacks.methods.steps.base import StepComponent


class L1Component(StepComponent):
    phase = "regularize"
    name = "l1"

    def __init__(self, targets: Sequence[Target], l1_lambda: float, ramp_of: Callable[[Optional[int]], int],
                 total_steps: Optional[int] = None):
        """``ramp_of(total_steps)`` gives the ramp in absolute steps (fractions resolve against the run)."""
        self.targets = list(targets)
        self.params = [t.param for t in self.targets]
        self.l1_lambda, self.ramp_of = l1_lambda, ramp_of
        self.resolve(total_steps)
        self.step = 0

    def resolve(self, total_steps: Optional[int]) -> None:
        self.ramp_steps = self.ramp_of(total_steps)

    def strength(self, step: Optional[int] = None) -> float:
        return l1_strength(self.step if step is None else step, l1_lambda=self.l1_lambda, ramp_steps=self.ramp_steps)

    def after_step(self, step: int, optimizer: Any) -> None:
        self.step = step
        strength = self.strength(step)
        if strength > 0:
            if optimizer is None:
                raise RuntimeError("l1_lambda > 0 needs the optimizer's learning rate: attach() or pass the optimizer")
            apply_l1_proximal(self.params, optimizer, strength)

    @torch.no_grad()
    def report(self) -> dict:
        zeros = sum(zero_count(p) for p in self.params)
        total = sum(p.numel() for p in self.params)
        return {"strength": float(self.strength()), "zero_fraction": zeros / total if total else 0.0}
