"""Compressed sparse checkpoints for pruned ``transformers`` models.

Pruned weights are exact zeros; :func:`save_sparse` stores each pruned tensor
as a bitmask of its nonzeros plus the nonzero values (see :mod:`.format`), and
:func:`load_sparse` returns an ordinary model with bitwise identical weights.
:func:`densify` converts to a standard ``save_pretrained`` folder.
"""

from prune_callbacks.export.sparse_io.bitmask import pack_bitmask, unpack_bitmask
from prune_callbacks.export.sparse_io.checkpoint import densify, is_sparse_checkpoint, load_sparse, read_sparse_state_dict, save_sparse
from prune_callbacks.export.sparse_io.errors import SparseCheckpointError
from prune_callbacks.export.sparse_io.writer import SparseSaveInfo

__all__ = [
    "save_sparse",
    "load_sparse",
    "densify",
    "read_sparse_state_dict",
    "is_sparse_checkpoint",
    "SparseCheckpointError",
    "SparseSaveInfo",
    "pack_bitmask",
    "unpack_bitmask",
]
