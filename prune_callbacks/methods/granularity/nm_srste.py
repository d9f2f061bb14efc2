"""N:M that can change its mind: SR-STE (Zhou et al. 2021), ``granularity="2:4-srste"`` (any ``N:M-srste``).

Plain ``N:M`` (:mod:`.nm`) zeroes a pruned weight for good: its theta * grad score is 0 from then on and a choice
made early is never revisited. Here the optimizer keeps *dense shadow weights* and the masks are re-chosen at every
mask update from all weights, so a pruned weight can come back:

* between optimizer steps each targeted parameter holds ``W * keep`` (the forward, a checkpoint, an evaluation and
  a ``state_dict`` all see exact N:M zeros); the dense ``W`` is kept here (``shadow``), one copy of the targets;
* before each real step (`prepare_step`) the dense ``W`` is put back into the parameter, so the gradient computed
  at ``W * keep`` reaches every weight unmasked (the straight-through estimator) and the saliency and the optimizer
  see the dense ``W`` (the theta * grad score of a pruned weight is nonzero again);
* the gradient of each pruned weight gets the SR-STE decay ``decay * W`` (`observe`, on steps that are not
  skipped), pulling pruned weights towards 0 so the pattern settles;
* after the step the parameter's new dense value becomes the shadow and ``W * keep`` is written back (`apply`);
* each mask update chooses the N:M candidates afresh (`NM.select_among` with nothing counted as already pruned),
  at the schedule's sparsity; `finalize` writes ``W * keep`` and drops the shadow: the saved model is a plain
  model with exact N:M zeros.

No forward hook and no parametrisation: the parameters stay the same objects with the same state-dict keys, so
the Trainer, Accelerate and a plain loop drive it through the Pruner's usual step hooks. Masks move only at the
schedule's updates (``start_step`` .. ``end_step``, every ``update_every``); after ``end_step`` they are fixed and
training goes on with the shadow. ``initial_sparsity`` equal to the final one gives the full N:M pattern from the
first update on (revisited at each later update); ``saliency="magnitude"`` makes that first mask the one-shot
per-group magnitude mask. Not built for FSDP2 shards (refused when the Pruner is built).
"""

from __future__ import annotations

from typing import Optional

import torch
from pydantic import BaseModel, ConfigDict, Field

from prune_callbacks.core.config_errors import FiniteFloat
from prune_callbacks.core.registry import register_granularity
from prune_callbacks.methods.granularity.nm import NM


class SRSTESettings(BaseModel):
    """``granularity_settings`` of ``N:M-srste``."""

    model_config = ConfigDict(extra="forbid")

    decay: FiniteFloat = Field(
        2e-4, ge=0.0, description="SR-STE decay: decay * W is added to the gradient of every pruned weight before "
        "the optimizer step (0: plain straight-through; the paper's lambda_W is 2e-4).")


@register_granularity("N:M-srste", pattern=r"(\d+):(\d+)-srste")
class NMSRSTE(NM):
    name = "N:M-srste"
    supports_sharding = False  # shadow copies of local rows are untested beside FSDP2: refused
    Settings = SRSTESettings

    @classmethod
    def check_config(cls, config, n="2", m="4"):
        """Besides N:M's checks: the accuracy guard (its rollback restores saved values of weights pruned since,
        assuming masks only grow) and the L1 step (untested beside the shadow) are refused."""
        problems = super().check_config(config, n, m)
        if getattr(config, "accuracy_guard", None) is not None:
            problems.append(f"accuracy_guard does not apply to granularity={config.granularity!r} (its rollback "
                            "assumes masks that only grow; N:M-srste revisits them); remove it or use 'N:M'")
        if getattr(config, "l1_lambda", 0.0):
            problems.append(f"l1_lambda={config.l1_lambda!r} does not apply to granularity={config.granularity!r} "
                            "(untested beside its dense shadow weights); allowed: 0")
        return problems

    def __init__(self, config, targets, model=None, n: str = "2", m: str = "4"):
        super().__init__(config, targets, model, n, m)
        self.decay = self.settings_of(config).decay
        self.shadow: Optional[list[torch.Tensor]] = None  # the dense weights, once masks exist
        self._dense = False  # whether the parameters hold the dense weights now (between prepare_step and apply)
        self.returned = 0  # weights unpruned by the last mask update

    # ---------------------------------------------------------- around the step
    @torch.no_grad()
    def prepare_step(self) -> None:
        """Put the dense weights back into the parameters before the gradients are read."""
        if self.shadow is not None and not self._dense:
            torch._foreach_copy_(self.params, self.shadow)
            self._dense = True

    @torch.no_grad()
    def observe(self, grads, grad_scale=None) -> None:
        """Add ``decay * W`` (times ``grad_scale`` when the gradients are still scaled) to pruned weights' gradients."""
        if self.shadow is None or self.decay == 0.0 or not self._dense:
            return
        scale = 1.0 if grad_scale is None else float(grad_scale)
        for grad, param, pruned in zip(grads, self.params, self.masks):
            grad.addcmul_(param, pruned.view(torch.uint8), value=self.decay * scale)

    def set_masks(self, masks) -> None:
        self.returned = sum(int((old & ~new).sum()) for old, new in zip(self.masks, masks))
        super().set_masks(masks)

    def select(self, scores, sparsity):
        """The N:M candidates chosen afresh from every weight's score: pruned weights may return."""
        return self.select_among(scores, sparsity, [torch.zeros_like(m) for m in self.masks])

    @torch.no_grad()
    def apply(self) -> None:
        """Keep the dense weights as the shadow and write ``W * keep`` (exact +0.0) into the parameters."""
        params = self.params
        if self.shadow is None:
            self.shadow = [p.detach().clone() for p in params]
        elif self._dense:
            torch._foreach_copy_(self.shadow, params)
        self._dense = False
        torch._foreach_copy_(params, self.shadow)
        super().apply()

    @torch.no_grad()
    def finalize(self) -> None:
        """``W * keep`` into the parameters; the shadow is freed (the model is a plain N:M-sparse model)."""
        if self.shadow is not None and not self._dense:
            torch._foreach_copy_(self.params, self.shadow)
        super().finalize()
        self.shadow, self._dense = None, False

    # ---------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.shadow is None:
            return {}
        dense = self.params if self._dense else self.shadow
        return {f"shadow/{name}": t.detach().clone() for name, t in zip(self.mask_names, dense)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if not state:
            self.shadow, self._dense = None, False
            return
        missing = [name for name in self.mask_names if f"shadow/{name}" not in state]
        if missing:
            raise ValueError(f"granularity={self.n}:{self.m}-srste state lacks the shadow weights of "
                             f"{', '.join(missing[:5])}")
        self.shadow = [state[f"shadow/{name}"].to(device=p.device, dtype=p.dtype).clone()
                       for name, p in zip(self.mask_names, self.params)]
        self._dense = False

    def report(self) -> dict:
        return {**super().report(), "decay": self.decay, "returned_at_last_update": self.returned}
