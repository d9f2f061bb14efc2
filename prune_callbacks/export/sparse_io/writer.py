"""Write a state dict as ``model.sparse.safetensors`` (layout: :mod:`.format`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from prune_callbacks.export.sparse_io.format import (
    BIT_VIEWS,
    CHECKSUM_KEY,
    FORMAT_NAME,
    FORMAT_VERSION,
    MASK_SUFFIX,
    METADATA_KEY,
    VALUES_SUFFIX,
    dtype_name,
    payload_digest,
)
from prune_callbacks.export.sparse_io.index import encode_index

__all__ = ["SparseSaveInfo", "write_sparse_file"]


@dataclass
class SparseSaveInfo:
    """What was written (returned by ``write_sparse_file`` and ``save_sparse``).

    Attributes:
        path: the written ``model.sparse.safetensors`` file.
        file_bytes: size of the written file.
        dense_bytes: bytes all tensors would take stored densely.
        compressed: names of the tensors stored as mask + values.
        compressed_dense_bytes: dense bytes of the compressed tensors.
        compressed_stored_bytes: mask + values bytes of the compressed tensors.
    """

    path: Path
    file_bytes: int
    dense_bytes: int
    compressed: list[str]
    compressed_dense_bytes: int
    compressed_stored_bytes: int

    @property
    def compressed_ratio(self) -> float:
        """Stored / dense bytes of the compressed tensors (1.0 when none)."""
        if self.compressed_dense_bytes == 0:
            return 1.0
        return self.compressed_stored_bytes / self.compressed_dense_bytes


def _compress(tensor: torch.Tensor, min_saving: float):
    """Return ``(encoding, index, values)`` or None when compression does not pay."""
    itemsize = tensor.element_size()
    if not tensor.is_floating_point() or itemsize not in BIT_VIEWS or tensor.numel() == 0:
        return None
    flat = tensor.reshape(-1)
    mask = flat.view(BIT_VIEWS[itemsize]) != 0  # bit patterns, not values: -0.0 is stored (report.zero_count)
    nnz = int(mask.sum())
    budget = (1.0 - min_saving) * flat.numel() * itemsize
    if nnz * itemsize >= budget:  # cannot pay whatever the index costs
        return None
    encoding, index = encode_index(mask)
    if index.numel() + nnz * itemsize >= budget:
        return None
    return encoding, index, flat[mask]


def write_sparse_file(
    state_dict: dict[str, torch.Tensor], path: str | os.PathLike, *, min_saving: float = 0.0
) -> SparseSaveInfo:
    """Write ``state_dict`` to ``path`` in the sparse format and fsync it.

    Raises:
        ValueError: if ``min_saving`` is outside ``[0, 1)`` or a tensor name
            ends with a reserved suffix.
    """
    if not 0.0 <= min_saving < 1.0:
        raise ValueError(f"min_saving must be in [0, 1), got {min_saving}")
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    dense_bytes = comp_dense = comp_stored = 0
    for name, tensor in state_dict.items():
        if name.endswith((MASK_SUFFIX, VALUES_SUFFIX)):
            raise ValueError(f"tensor name {name!r} ends with a suffix reserved by the sparse format")
        tensor = tensor.detach().to("cpu").contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        dense_bytes += nbytes
        packed = _compress(tensor, min_saving)
        if packed is None:
            tensors[name] = tensor
            continue
        encoding, index, values = packed
        tensors[name + MASK_SUFFIX] = index
        tensors[name + VALUES_SUFFIX] = values
        entries[name] = {
            "shape": list(tensor.shape),
            "dtype": dtype_name(tensor.dtype),
            "index": encoding,
            "nnz": values.numel(),
        }
        comp_dense += nbytes
        comp_stored += index.numel() + values.numel() * values.element_size()
    header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "tensors": entries,
              CHECKSUM_KEY: {key: payload_digest(t) for key, t in tensors.items()}}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(header, sort_keys=True)}
    save_file(tensors, os.fspath(path), metadata=metadata)
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())
    return SparseSaveInfo(
        path=Path(path),
        file_bytes=os.path.getsize(path),
        dense_bytes=dense_bytes,
        compressed=sorted(entries),
        compressed_dense_bytes=comp_dense,
        compressed_stored_bytes=comp_stored,
    )
