"""The ridge least-squares solve both mergers refit an output projection with (:mod:`.merging`, :mod:`.block_merging`)."""

from __future__ import annotations

import torch


def solve_dtype(device: torch.device) -> torch.dtype:
    """The dtype a fit is solved in: float64 where the device has it (MPS has not)."""
    return torch.float32 if device.type == "mps" else torch.float64


def damped(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """``gram + lambda I`` with ``lambda = damping * mean(diag gram)`` (``damping`` where that is 0)."""
    scale = float(gram.diagonal().mean()) if gram.numel() else 0.0
    lam = damping * (scale if scale > 0 else 1.0)
    return gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)


def ridge_solve(gram: torch.Tensor, cross: torch.Tensor, damping: float) -> torch.Tensor:
    """``damped(gram)^-1 cross``: the ridge least-squares fit ``X`` of targets whose cross term with the inputs is
    ``cross`` (``[in, out]``)."""
    return _solve(damped(gram, damping), cross)


def _solve(damped: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``damped^-1 rhs`` for a symmetric positive (semi)definite ``damped``: Cholesky, least squares where it fails."""
    chol, info = torch.linalg.cholesky_ex(damped)
    return torch.cholesky_solve(rhs, chol) if int(info) == 0 else torch.linalg.lstsq(damped, rhs).solution
