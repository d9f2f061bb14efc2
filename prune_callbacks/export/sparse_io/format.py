"""On-disk layout of ``model.sparse.safetensors``: names, constants, metadata.

The checkpoint is one ordinary safetensors file. For every *compressed* tensor
``NAME`` it holds two tensors:

* ``NAME.__mask__`` -- a 1-D ``uint8`` index of the nonzero elements, encoded as
  a plain or two-level little-endian bitmask (see :mod:`.index`);
* ``NAME.__values__`` -- the nonzero elements, 1-D, in row-major order, in the
  original dtype (fp32, bf16, fp16, ...).

Every other tensor is stored unchanged under its own name. An element counts as
zero only when its *bit pattern* is all zeros, so ``-0.0`` and NaN payloads are
kept as values and the round trip is bitwise exact.

The safetensors metadata (string -> string) holds ``"format": "pt"`` (as
transformers writes) and, under :data:`METADATA_KEY`, a JSON document::

    {"format": "prune_callbacks.sparse", "version": 1,
     "tensors": {NAME: {"shape": [...], "dtype": "bfloat16",
                        "index": "bitmask" | "bitmask2", "nnz": 1234}, ...},
     "sha256": {STORED_KEY: "<hex digest of its bytes>", ...}}

``sha256`` holds one digest per tensor stored in the file (masks, values and dense
tensors alike, keyed by the stored name; `payload_digest`), and every reader verifies
them, so a flipped payload byte is an error naming the file and the tensor, not a
silently different weight. Files written before the digests existed have no
``sha256`` entry: they are read with a warning that corruption cannot be detected.

A tensor is compressed only when ``index bytes + nnz * itemsize`` is smaller
than ``(1 - min_saving) * dense bytes``; unpruned tensors therefore stay dense.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "METADATA_KEY",
    "WEIGHTS_NAME",
    "MASK_SUFFIX",
    "VALUES_SUFFIX",
    "BIT_VIEWS",
    "dtype_name",
    "CHECKSUM_KEY",
    "payload_digest",
]

FORMAT_NAME = "prune_callbacks.sparse"
FORMAT_VERSION = 1
METADATA_KEY = "prune_callbacks.sparse"
WEIGHTS_NAME = "model.sparse.safetensors"
MASK_SUFFIX = ".__mask__"
VALUES_SUFFIX = ".__values__"

CHECKSUM_KEY = "sha256"

# Same-width integer views used to find elements whose bit pattern is nonzero.
BIT_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the name used in the metadata)."""
    return str(dtype).removeprefix("torch.")


def payload_digest(tensor: torch.Tensor) -> str:
    """sha256 hex digest of a tensor's bytes as stored (row-major, its own dtype)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy() if flat.numel() else b"").hexdigest()  # no copy
