"""Read and validate ``model.sparse.safetensors`` (layout: :mod:`.format`).

Everything read from the file is treated as untrusted: each inconsistency
raises :class:`.SparseCheckpointError` naming the file and the problem, and every
stored tensor's bytes are checked against the sha256 digest written with it
(`read_sparse_file` is the one reader: ``load_sparse``, ``densify``,
``read_sparse_state_dict`` and ``report`` go through it). A file without digests
(written before they existed) is read with a warning.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import safe_open

from prune_callbacks.export.sparse_io.errors import SparseCheckpointError
from prune_callbacks.export.sparse_io.format import (
    CHECKSUM_KEY, FORMAT_NAME, FORMAT_VERSION, MASK_SUFFIX, METADATA_KEY, VALUES_SUFFIX, dtype_name, payload_digest,
)
from prune_callbacks.export.sparse_io.index import ENCODINGS, decode_index

__all__ = ["read_sparse_file", "has_sparse_header"]


def _parse_header(path: Path, metadata: dict[str, str] | None) -> tuple[dict[str, dict], dict | None]:
    """Validate the metadata document; return its ``tensors`` table and its checksums (None: an older file)."""
    if not metadata or METADATA_KEY not in metadata:
        raise SparseCheckpointError(
            path, f"metadata missing: no {METADATA_KEY!r} entry, not a {FORMAT_NAME} checkpoint"
        )
    try:
        header = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise SparseCheckpointError(path, f"metadata {METADATA_KEY!r} is not valid JSON: {exc}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        found = header.get("format") if isinstance(header, dict) else header
        raise SparseCheckpointError(path, f"metadata names format {found!r}, expected {FORMAT_NAME!r}")
    if header.get("version") != FORMAT_VERSION:
        raise SparseCheckpointError(
            path,
            f"unsupported format version {header.get('version')!r} "
            f"(this prune_callbacks reads version {FORMAT_VERSION})",
        )
    table = header.get("tensors")
    if not isinstance(table, dict):
        raise SparseCheckpointError(path, "metadata 'tensors' table is missing or not an object")
    for name, entry in table.items():
        _check_entry(path, name, entry)
    checksums = header.get(CHECKSUM_KEY)
    if checksums is not None and not (isinstance(checksums, dict)
                                      and all(isinstance(v, str) for v in checksums.values())):
        raise SparseCheckpointError(path, f"metadata {CHECKSUM_KEY!r} table is not an object of hex digests")
    return table, checksums


def _verify(path: Path, raw: dict[str, torch.Tensor], checksums: dict | None) -> None:
    """Every stored tensor's bytes against its digest (`.format.payload_digest`)."""
    if checksums is None:
        warnings.warn(f"{path}: written without checksums (an older prune_callbacks); no checksums to verify, so "
                      "corrupted payload bytes cannot be detected. Re-save it to add them", stacklevel=3)
        return
    for key in sorted(raw):
        expected = checksums.get(key)
        if expected is None:
            raise SparseCheckpointError(path, f"tensor {key!r} has no checksum in the metadata (file altered)")
        if payload_digest(raw[key]) != expected:
            raise SparseCheckpointError(
                path, f"tensor {key!r}: checksum mismatch, its stored bytes are corrupted (sha256 differs from the "
                "one written); restore the file from a good copy")
    extra = sorted(set(checksums) - set(raw))
    if extra:
        raise SparseCheckpointError(path, f"metadata has checksums for tensors not in the file: {extra[:5]}")


def _check_entry(path: Path, name: str, entry) -> None:
    def bad(what: str):
        raise SparseCheckpointError(path, f"metadata for tensor {name!r}: {what}")

    if not isinstance(entry, dict):
        bad("entry is not an object")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        bad(f"invalid shape {shape!r}")
    dtype = getattr(torch, str(entry.get("dtype")), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        bad(f"unsupported dtype {entry.get('dtype')!r}")
    if entry.get("index") not in ENCODINGS:
        bad(f"unknown index encoding {entry.get('index')!r}")
    nnz = entry.get("nnz")
    if not isinstance(nnz, int) or nnz < 0:
        bad(f"invalid nnz {nnz!r}")


def _densify_one(
    path: Path, name: str, entry: dict, index: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """Rebuild one dense tensor from its index and values, validating both."""
    dtype = getattr(torch, entry["dtype"])
    numel = 1
    for dim in entry["shape"]:
        numel *= dim
    try:
        mask = decode_index(entry["index"], index, numel)
    except ValueError as exc:
        raise SparseCheckpointError(path, f"tensor {name!r}: {exc}") from None
    popcount = int(mask.sum())
    if values.dtype != dtype or values.dim() != 1:
        raise SparseCheckpointError(
            path,
            f"tensor {name!r}: values must be 1-D {entry['dtype']}, got "
            f"{dtype_name(values.dtype)} with shape {list(values.shape)}",
        )
    if values.numel() != popcount or entry["nnz"] != popcount:
        raise SparseCheckpointError(
            path,
            f"tensor {name!r}: values count {values.numel()} (metadata nnz {entry['nnz']}) "
            f"does not equal the mask's popcount {popcount}",
        )
    out = torch.zeros(numel, dtype=dtype)
    out[mask] = values
    return out.view(entry["shape"])


def _check_keys(path: Path, keys: set[str], table: dict[str, dict]) -> None:
    for key in sorted(keys):
        if key.endswith(MASK_SUFFIX):
            base = key[: -len(MASK_SUFFIX)]
            if base + VALUES_SUFFIX not in keys:
                raise SparseCheckpointError(path, f"missing {base + VALUES_SUFFIX!r} for {key!r}")
        elif key.endswith(VALUES_SUFFIX):
            base = key[: -len(VALUES_SUFFIX)]
            if base + MASK_SUFFIX not in keys:
                raise SparseCheckpointError(path, f"missing {base + MASK_SUFFIX!r} for {key!r}")
        else:
            continue
        if base not in table:
            raise SparseCheckpointError(path, f"{key!r} has no entry in the metadata 'tensors' table")
        if base in keys:
            raise SparseCheckpointError(path, f"tensor {base!r} is stored both dense and compressed")
    for name in table:
        if name + MASK_SUFFIX not in keys:
            raise SparseCheckpointError(
                path, f"metadata lists {name!r} but {name + MASK_SUFFIX!r} is missing"
            )


def read_sparse_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a sparse safetensors file; return its dense state dict.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        SparseCheckpointError: if the file is not a readable safetensors file,
            is not in this format, has an unsupported version, or any stored
            tensor is inconsistent with the metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such sparse checkpoint file")
    try:
        with safe_open(os.fspath(path), framework="pt") as fh:
            table, checksums = _parse_header(path, fh.metadata())
            keys = set(fh.keys())
            _check_keys(path, keys, table)
            raw = {key: fh.get_tensor(key) for key in keys}
    except SparseCheckpointError:
        raise
    except Exception as exc:  # safetensors raises SafetensorError / OSError / ...
        raise SparseCheckpointError(
            path, f"not a readable safetensors file (corrupt or truncated): {type(exc).__name__}: {exc}"
        ) from exc
    _verify(path, raw, checksums)
    state_dict: dict[str, torch.Tensor] = {}
    for key in sorted(keys):
        if key.endswith(VALUES_SUFFIX):
            continue
        if key.endswith(MASK_SUFFIX):
            name = key[: -len(MASK_SUFFIX)]
            values = raw.pop(name + VALUES_SUFFIX)
            state_dict[name] = _densify_one(path, name, table[name], raw.pop(key), values)
        else:
            state_dict[key] = raw.pop(key)
    return state_dict


def has_sparse_header(path: str | os.PathLike) -> bool:
    """True when ``path`` is a safetensors file whose metadata names this format."""
    try:
        with safe_open(os.fspath(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
        return json.loads(metadata.get(METADATA_KEY, "{}")).get("format") == FORMAT_NAME
    except Exception:  # any unreadable/foreign file is simply "not sparse"
        return False
