"""L1 regularisation of the targeted weights as a proximal step.

After each optimizer step every targeted weight is soft-thresholded,
``w <- sign(w) * max(|w| - lr * lambda, 0)``, with ``lr`` the learning rate of
the weight's parameter group. This is the proximal operator of
``lambda * |w|``, applied decoupled from the optimizer the way AdamW decouples
weight decay. Why not a gradient term ``lambda * sign(w)``:

* Adam divides every gradient by its running RMS, so a sub-gradient penalty's
  strength would vary per weight with the data gradient's scale and would
  almost never produce exact zeros; the proximal step shrinks every weight by
  the same ``lr * lambda`` and makes small weights exactly zero.
* It leaves ``grad`` untouched, so gradient-based saliency (taylor, platon,
  movement) still scores the data loss alone.

Pruned weights are re-masked right after, so L1 never revives them.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def apply_l1_proximal(params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer, strength: float) -> None:
    lr_of = {id(p): float(group["lr"]) for group in optimizer.param_groups for p in group["params"]}
    for param in params:
        shrink = lr_of.get(id(param), 0.0) * strength
        if shrink > 0:
            param.copy_(F.softshrink(param, shrink))
