"""Run finalized 2:4 weights with torch's semi-structured sparse tensors (NVIDIA sparse tensor cores).

Measured on an H200 (BENCHMARKS.md): 2:4 was *slower* than dense for BERT-base inference
and only 1.15-1.34x faster on 11008x4096 linears at 16k tokens. Convert only where a
benchmark of your own shapes says it pays.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

#: cuSPARSELt / CUTLASS constraints for semi-structured weights (rows, columns multiples of these)
_MIN_MULTIPLE = {torch.float16: 64, torch.bfloat16: 64, torch.int8: 128}


def is_2to4(weight: torch.Tensor) -> bool:
    """Whether every group of 4 consecutive weights along the input dimension has at most 2 non-zeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool((weight.reshape(-1, 4).count_nonzero(dim=-1) <= 2).all())


def to_semi_structured(model: nn.Module, include: Optional[Iterable[str]] = None) -> list[str]:
    """Replace the weight of every 2:4-sparse ``nn.Linear`` (or those named in ``include``) by a
    ``torch.sparse.SparseSemiStructuredTensor``, in place; returns the converted module names.

    Needs a CUDA GPU with sparse tensor cores (compute capability 8.0+), weights in float16,
    bfloat16 or int8 on that GPU, and shapes that are multiples of 64 (128 for int8). Every
    offender is listed in one error; nothing is converted then.
    """
    if not torch.cuda.is_available():
        raise RuntimeError(
            "to_semi_structured needs a CUDA GPU with sparse tensor cores (compute capability 8.0 or newer); "
            "on CPU keep the dense model (its zeros are exact) or save it with save_sparse() for storage"
        )
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        raise RuntimeError(f"to_semi_structured needs compute capability >= 8.0, this GPU has {major}.{minor}")
    from torch.sparse import to_sparse_semi_structured

    wanted = set(include) if include is not None else None
    chosen, problems = [], []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or (wanted is not None and name not in wanted):
            continue
        w = module.weight
        if wanted is None and not is_2to4(w):
            continue
        multiple = _MIN_MULTIPLE.get(w.dtype)
        if w.device.type != "cuda":
            problems.append(f"{name}: on {w.device}, move the model to the GPU first")
        elif multiple is None:
            problems.append(f"{name}: dtype {w.dtype} (allowed: float16, bfloat16, int8)")
        elif w.shape[0] % multiple or w.shape[1] % multiple:
            problems.append(f"{name}: shape {tuple(w.shape)} (both dimensions must be multiples of {multiple})")
        elif not is_2to4(w):
            problems.append(f"{name}: not 2:4 sparse (finalize a granularity='2:4' run first)")
        else:
            chosen.append((name, module))
    if wanted is not None:
        problems += [f"{n}: no such nn.Linear" for n in sorted(wanted - {n for n, _ in model.named_modules()})]
    if problems:
        raise ValueError("cannot convert to semi-structured sparsity:\n  " + "\n  ".join(problems))
    for _, module in chosen:
        module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach()), requires_grad=False)
    return [n for n, _ in chosen]
