"""Gradual pruning in a hand-written Accelerate loop: `AcceleratePruningHook` (:mod:`.hook`), the accuracy
guard (:mod:`.guard`) and distillation (:mod:`.distillation`) hooks, and what they share (:mod:`.support`)."""

from prune_callbacks.integrations.accelerate.hook import AcceleratePruningHook

__all__ = ["AcceleratePruningHook"]
