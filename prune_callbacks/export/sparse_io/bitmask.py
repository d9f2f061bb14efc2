"""Vectorised packing of boolean masks into bytes, 8 elements per byte.

Bit order is little-endian inside each byte: element ``8 * i + j`` of the
flattened mask is bit ``j`` (value ``1 << j``) of byte ``i``. When the number of
elements is not a multiple of 8, the unused high bits of the last byte are 0.
All work is done with whole-tensor torch operations (no Python loop over
elements); temporaries are ``uint8`` so memory stays near ``numel`` bytes.
"""

from __future__ import annotations

import torch

__all__ = ["pack_bitmask", "unpack_bitmask", "packed_size", "padding_bits_set"]

_SHIFTS = torch.arange(8, dtype=torch.uint8)


def packed_size(numel: int) -> int:
    """Number of bytes that hold ``numel`` bits (``ceil(numel / 8)``)."""
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    return (numel + 7) // 8


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor of any shape into a 1-D ``uint8`` tensor.

    Args:
        mask: a ``torch.bool`` tensor; it is flattened in row-major order.

    Returns:
        A 1-D ``uint8`` tensor of ``ceil(mask.numel() / 8)`` bytes on the same
        device as ``mask``.

    Raises:
        TypeError: if ``mask`` is not a ``torch.bool`` tensor.
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"pack_bitmask expects a torch.bool tensor, got {got}")
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = flat.view(-1, 8)
    # Bits are disjoint, so a uint8 sum is an exact bitwise OR (max 255).
    return (bits << _SHIFTS.to(bits.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bitmask(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bitmask`: return a 1-D bool tensor of ``numel``.

    Bits past ``numel`` in the last byte are ignored here; use
    :func:`padding_bits_set` to reject them when validating untrusted input.

    Raises:
        TypeError: if ``packed`` is not a ``uint8`` tensor.
        ValueError: if ``numel`` is negative or ``packed`` does not hold
            exactly ``ceil(numel / 8)`` bytes.
    """
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        got = packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise TypeError(f"unpack_bitmask expects a torch.uint8 tensor, got {got}")
    expected = packed_size(numel)
    if packed.numel() != expected:
        raise ValueError(
            f"packed bitmask has {packed.numel()} bytes, expected {expected} for {numel} elements"
        )
    bits = (packed.reshape(-1, 1) >> _SHIFTS.to(packed.device)) & 1
    return bits.reshape(-1)[:numel].to(torch.bool)


def padding_bits_set(packed: torch.Tensor, numel: int) -> bool:
    """True when any bit past element ``numel`` is set in the last byte."""
    tail = numel % 8
    if tail == 0 or packed.numel() == 0:
        return False
    return bool(int(packed[-1]) >> tail)
