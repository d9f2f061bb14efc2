"""`LowRankLinear` and the low-rank exporter: a rank-``r`` weight becomes two thin Linears.

``W [m, n]`` already equals ``W V V^T`` (``V [n, r]``: the basis the granularity kept it on), so
``down = V^T [r, n]`` (no bias) and ``up = W V [m, r]`` (the original bias) reproduce it: the
product of the factors equals the weight up to float rounding (computed in float32, stored in the
weight's dtype). Parameters go from ``m*n`` to ``r*(m + n)``.
"""

from __future__ import annotations

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """``y = up(down(x))``: ``down`` maps ``in_features -> rank`` (no bias), ``up`` ``rank -> out_features``."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def dense_weight(self) -> torch.Tensor:
        """``up.weight @ down.weight`` (computed in float32, returned in the factors' dtype)."""
        return (self.up.weight.float() @ self.down.weight.float()).to(self.up.weight.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


@torch.no_grad()
def factorize_linear(linear: nn.Linear, basis: torch.Tensor) -> LowRankLinear:
    """Two Linears reproducing ``linear`` on the subspace ``basis`` (``[in_features, r]``, float32)."""
    weight = linear.weight
    out = LowRankLinear(linear.in_features, linear.out_features, basis.shape[1], linear.bias is not None,
                        device=weight.device, dtype=weight.dtype)
    basis = basis.to(device=weight.device, dtype=torch.float32)
    out.down.weight.copy_(basis.T)
    out.up.weight.copy_(weight.float() @ basis)
    if linear.bias is not None:
        out.up.bias.copy_(linear.bias)
    out.train(linear.training)
    return out


def _bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@torch.no_grad()
def factorize_granularities(model: nn.Module, granularities) -> dict:
    """The ``"low_rank"`` export (`prune_callbacks.export.dispatch.EXPORTS`): replace each target below break-even by a `LowRankLinear`.

    Returns ``params_before/after``, ``bytes_before/after`` (the model's parameters, tied ones once)
    and ``ranks`` (module name -> rank) of the replaced modules.
    """
    params_before, bytes_before = sum(p.numel() for p in model.parameters()), _bytes(model)
    ranks = {}
    for granularity in granularities:
        for target, basis in zip(granularity.targets, granularity.bases):
            if basis is None:
                continue
            linear = model.get_submodule(target.name)
            if not isinstance(linear, nn.Linear):
                raise TypeError(f"low_rank export: {target.name} is a {type(linear).__name__}, not an nn.Linear")
            _set_module(model, target.name, factorize_linear(linear, basis))
            ranks[target.name] = basis.shape[1]
    return {"params_before": params_before, "params_after": sum(p.numel() for p in model.parameters()),
            "bytes_before": bytes_before, "bytes_after": _bytes(model), "ranks": ranks}


def low_rank_modules(model: nn.Module) -> dict[str, int]:
    """``{module name: rank}`` of the model's `LowRankLinear` modules."""
    return {name: m.rank for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


@torch.no_grad()
def densify_model(model: nn.Module) -> dict[str, int]:
    """Replace every `LowRankLinear` by an ``nn.Linear`` holding its product, in place; returns the ranks replaced."""
    ranks = low_rank_modules(model)
    for name in ranks:
        module = model.get_submodule(name)
        linear = nn.Linear(module.in_features, module.out_features, bias=module.up.bias is not None,
                           device=module.up.weight.device, dtype=module.up.weight.dtype)
        linear.weight.copy_(module.dense_weight())
        if module.up.bias is not None:
            linear.bias.copy_(module.up.bias)
        _set_module(model, name, linear)
    return ranks
