"""Saliency scores: how much each targeted weight matters (higher = keep).

Each method is updated once per *real* optimizer step from the accumulated,
unscaled gradient, and keeps its buffers in float32 whatever the parameter
dtype. The ``importance_scores`` seam of ``torch.nn.utils.prune`` is the
model: a method only produces scores; choosing and applying masks is elsewhere.

Extra memory per prunable parameter (on top of the 1-byte mask):

============  =====  ==================================================
method        bytes  buffers
============  =====  ==================================================
taylor        4      EMA of |theta * grad|
platon        8      EMA importance, EMA uncertainty (Zhang et al. 2022)
movement      4      accumulated -theta * grad (Sanh et al. 2020)
magnitude     0      none: the score is |theta|
unit_taylor   ~0     EMA of (sum over a unit of theta * grad)^2: one float per unit
============  =====  ==================================================

``unit_taylor`` is the one *unit-level* method (``per_unit``): it scores whole structured
units (FFN neurons, KV groups, blocks), so it applies only to the granularities that
have them (``Granularity.unit_scored``; anything else is a config error). Per step it
sums the signed theta * grad over each unit's slices (the first-order change of the
loss if the unit were removed, Molchanov et al. 2019's group form) and keeps the EMA of
its square; the per-weight methods sum |theta * grad| over the unit instead, after the
EMA, which counts a unit whose weights pull against each other as important.

Working buffer: a float32 theta*grad per float32 target (4 bytes per parameter),
allocated once and reused every step (it used to be allocated and freed per
step: the same peak, twice the hook time on CPU); a mask update adds the new boolean masks
(1 byte per parameter) and the radix selection's fixed working set (about 20 MB, whatever the
model size: :mod:`prune_callbacks.methods.selection`), with no flat copy of the scores (BENCHMARKS.md,
"Selection"). Mask updates are rare (``update_every``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from prune_callbacks.core.registry import SALIENCIES, register_saliency

BYTES_PER_PARAM = {"taylor": 4, "platon": 8, "movement": 4, "magnitude": 0, "unit_taylor": 0}


class Saliency:
    """Base class: per-target float32 buffers named in ``buffer_names``."""

    name = "base"
    buffer_names: tuple[str, ...] = ()
    needs_gradients = True
    #: PruningConfig fields this method reads (``beta``, ``uncertainty_beta``); setting others is an error
    hyperparameters: tuple[str, ...] = ()
    #: scores one value per structured unit, not per weight: built with ``units`` (the granularity, which
    #: gives ``unit_scores`` and ``units_per_group``) and selected through its ``select_units``
    per_unit = False

    def __init__(self, params: Sequence[torch.Tensor], **_hyperparameters):
        self.buffers: dict[str, list[torch.Tensor]] = {
            b: [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params] for b in self.buffer_names
        }

    def update(self, params: Sequence[torch.Tensor], prods: list[torch.Tensor]) -> None:
        """Fold one optimizer step into the buffers; ``prods`` is float32 theta * unscaled grad (consumed)."""

    def scores(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, list[torch.Tensor]]:
        return {name: list(bufs) for name, bufs in self.buffers.items()}

    def load_state_dict(self, state: dict[str, Sequence[torch.Tensor]]) -> None:
        for name in self.buffer_names:
            for dst, src in zip(self.buffers[name], state[name]):
                dst.copy_(src)

    def release(self) -> None:
        """Free the buffers (after finalize)."""
        self.buffers = {name: [] for name in self.buffer_names}


def _products(params, grads, grad_scale: Optional[float], out: Optional[list] = None) -> list[torch.Tensor]:
    """theta * grad in float32, divided by ``grad_scale`` when the gradients are still scaled.

    With ``out`` (float32 buffers, one per float32 parameter), the products are written there:
    no allocation per step, which on CPU halves the hook's time (fresh multi-MB buffers are
    page-faulted in on every step).
    """
    if out is not None:
        prods = []
        for p, g, buf in zip(params, grads, out):
            if p.dtype == torch.float32 and g.dtype == torch.float32:
                prods.append(torch.mul(p.detach(), g, out=buf))
            else:
                prods.append((p.detach() * g).float())
    else:
        prods = torch._foreach_mul([p.detach() for p in params], list(grads))
        prods = [t if t.dtype == torch.float32 else t.float() for t in prods]
    if grad_scale is not None and grad_scale != 1.0:
        torch._foreach_div_(prods, float(grad_scale))
    return prods


@register_saliency("taylor")
class Taylor(Saliency):
    """EMA of the first-order Taylor importance |theta * grad| (Molchanov et al. 2019)."""

    name = "taylor"
    buffer_names = ("importance",)
    hyperparameters = ("beta",)

    def __init__(self, params, beta: float = 0.85, **_):
        super().__init__(params)
        self.beta = beta

    def update(self, params, prods):
        torch._foreach_abs_(prods)
        torch._foreach_lerp_(self.buffers["importance"], prods, 1.0 - self.beta)

    def scores(self, params):
        return self.buffers["importance"]


@register_saliency("platon")
class Platon(Saliency):
    """PLATON (Zhang et al. 2022): EMA importance times EMA of its uncertainty |I - EMA(I)|."""

    name = "platon"
    buffer_names = ("importance", "uncertainty")
    hyperparameters = ("beta", "uncertainty_beta")

    def __init__(self, params, beta: float = 0.85, uncertainty_beta: float = 0.95, **_):
        super().__init__(params)
        self.beta, self.uncertainty_beta = beta, uncertainty_beta

    def update(self, params, prods):
        importance, uncertainty = self.buffers["importance"], self.buffers["uncertainty"]
        torch._foreach_abs_(prods)
        torch._foreach_lerp_(importance, prods, 1.0 - self.beta)
        torch._foreach_sub_(prods, importance)
        torch._foreach_abs_(prods)
        torch._foreach_lerp_(uncertainty, prods, 1.0 - self.uncertainty_beta)

    def scores(self, params):
        return torch._foreach_mul(self.buffers["importance"], self.buffers["uncertainty"])


@register_saliency("movement")
class Movement(Saliency):
    """Movement pruning (Sanh et al. 2020): accumulated -theta * grad; weights moving towards 0 score low."""

    name = "movement"
    buffer_names = ("movement",)

    def update(self, params, prods):
        torch._foreach_sub_(self.buffers["movement"], prods)

    def scores(self, params):
        return self.buffers["movement"]


@register_saliency("magnitude")
class Magnitude(Saliency):
    """|theta|: the classic baseline; needs no gradient and no buffer."""

    name = "magnitude"
    needs_gradients = False

    def scores(self, params):
        return [p.detach().abs().float() for p in params]


@register_saliency("unit_taylor")
class UnitTaylor(Saliency):
    """EMA of (sum over a unit of theta * grad)^2 per structured unit (Molchanov et al. 2019, the group form).

    ``units`` is the granularity: ``unit_scores`` sums a per-weight tensor over each unit's slices (under
    FSDP2 with one all-reduce, so every rank holds the same sums) and ``units_per_group`` sizes the buffers.
    """

    name = "unit_taylor"
    buffer_names = ("importance",)
    hyperparameters = ("beta",)
    per_unit = True

    def __init__(self, params, beta: float = 0.85, units=None, **_):
        if units is None or not getattr(units, "unit_scored", False):
            raise ValueError(f"saliency={self.name!r} scores whole structured units; build it with a granularity "
                             "that has them (one whose unit_scored is True)")
        device = params[0].device if params else None
        self.buffers = {"importance": [torch.zeros(n, dtype=torch.float32, device=device)
                                       for n in units.units_per_group]}
        self.units, self.beta = units, beta

    def update(self, params, prods):
        sums = self.units.unit_scores(prods)  # signed: weights of one unit pulling apart cancel
        torch._foreach_mul_(sums, sums)
        torch._foreach_lerp_(self.buffers["importance"], sums, 1.0 - self.beta)

    def scores(self, params):
        return self.buffers["importance"]


def make_saliency(name: str, params: Sequence[torch.Tensor], units=None, **kwargs) -> Saliency:
    """Build the registered saliency ``name``, passing only the hyperparameters it declares (and ``units``,
    the granularity, to a unit-level one)."""
    try:
        cls = SALIENCIES.get(name)
    except KeyError as exc:
        raise ValueError(str(exc.args[0])) from None
    hyper = {k: v for k, v in kwargs.items() if k in cls.hyperparameters}
    return cls(params, units=units, **hyper) if cls.per_unit else cls(params, **hyper)


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every value is finite: one fused L2-norm pass and one host sync.

    (The L1 norm is ~6x slower on CPU; the L2 norm is finite iff every value is,
    barring magnitudes above ~1e19.)
    """
    if not tensors:
        return True
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(list(tensors))).sum()))


def gradient_products(params, grads, grad_scale: Optional[float] = None, out: Optional[list] = None) -> tuple[list[torch.Tensor], bool]:
    """theta * grad per target (float32, unscaled; into ``out`` if given) and whether every value is finite."""
    prods = _products(params, grads, grad_scale, out)
    return prods, all_finite(prods)
