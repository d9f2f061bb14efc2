"""The accuracy guard's answer, told to the user whatever their logging setup (Trainer and Accelerate alike).

`tell_verdict` logs ``accuracy guard: eval_accuracy 0.8100 at 50.0% sparsity, dense 0.8400, allowed drop
0.05: met`` as a warning (training scripts usually drop INFO, and this is a result the user asked for),
and, when the criterion is not met, also raises a Python `AccuracyGuardWarning`, which scripts and
test runners show and can turn into errors (``warnings.simplefilter("error", AccuracyGuardWarning)``).
"""

from __future__ import annotations

import logging
import warnings

logger = logging.getLogger("prune_callbacks.controllers.guard")


class AccuracyGuardWarning(UserWarning):
    """The accuracy guard's criterion was not met at the end of the run."""


def verdict(config, final: dict) -> str:
    """One line: the guarded metric at the final sparsity against the dense baseline and the allowed drop."""
    return (f"accuracy guard: {config.metric} {final['metric']:.4f} at {final['sparsity']:.1%} sparsity, dense "
            f"{final['baseline']:.4f}, allowed drop {config.max_drop}: "
            + ("met" if final["met"] else "NOT met (also after rolling back to the last sparsity that met it, "
                                          "where there was one)"))


def tell_verdict(config, final: dict) -> None:
    text = verdict(config, final)
    logger.warning("prune_callbacks: %s", text)
    if not final["met"]:
        warnings.warn(f"prune_callbacks: {text}", AccuracyGuardWarning, stacklevel=3)
