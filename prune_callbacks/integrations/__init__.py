"""Adapters that run the core `Pruner` inside training frameworks.

* :mod:`prune_callbacks.integrations.trainer`: ``transformers.Trainer`` callbacks
  (``make_callbacks``, ``GradualPruningCallback``, ``L1RegularizationCallback``,
  ``PermanentMaskCallback``, ``evaluate_dense``).
* :mod:`prune_callbacks.integrations.accelerate.hook`: a hook for hand-written
  Accelerate loops.

Nothing is imported here, so ``import prune_callbacks`` never imports
``transformers`` or ``accelerate``; import the submodule you need.
"""
