"""Save, load and densify a model whose Linears were factorised (`~.factorize.LowRankLinear`).

A plain ``from_pretrained`` cannot build the factorised modules of most architectures (their
config has one width per projection), so a low-rank checkpoint is its own folder:

* ``model.low_rank.safetensors``: the model's state dict (tied aliases once, factors under
  ``<module>.down.weight`` / ``<module>.up.weight``), its metadata a JSON document
  ``{"format": "prune_callbacks.export.low_rank", "version": 1, "ranks": {module: rank}}``;
* ``config.json`` (and ``generation_config.json``, tokenizer files) as ``save_pretrained`` writes them.

Written like the sparse checkpoint (staging folder, ``os.replace``, weights file last:
:func:`prune_callbacks.export.sparse_io.checkpoint.write_checkpoint_folder`); read as untrusted: every
problem raises `LowRankCheckpointError` naming the file and what is wrong. `load_low_rank` gives
the factorised model with bitwise equal tensors; `densify` writes a plain ``save_pretrained``
folder (each weight the product of its factors, computed in float32).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from prune_callbacks.export.sparse_io._hf import drop_tied_aliases, resolve_model_class
from prune_callbacks.export.sparse_io.checkpoint import copy_side_files, write_checkpoint_folder
from prune_callbacks.export.sparse_io.errors import SparseCheckpointError
from prune_callbacks.export.sparse_io.format import dtype_name
from prune_callbacks.export.low_rank.factorize import LowRankLinear, _set_module, densify_model, low_rank_modules

__all__ = ["save_low_rank", "load_low_rank", "densify", "LowRankCheckpointError", "WEIGHTS_NAME"]

WEIGHTS_NAME = "model.low_rank.safetensors"
FORMAT_NAME = "prune_callbacks.export.low_rank"
FORMAT_VERSION = 1
METADATA_KEY = "prune_callbacks.export.low_rank"


class LowRankCheckpointError(SparseCheckpointError):
    """A low-rank checkpoint that is damaged, foreign or does not match its config (``path: problem``)."""


def save_low_rank(model, directory, tokenizer=None) -> dict:
    """Save a ``transformers`` model holding `LowRankLinear` modules; returns ``{path, file_bytes, ranks}``."""
    from safetensors.torch import save_file

    if not hasattr(model, "config") or not hasattr(model, "state_dict"):
        raise TypeError(f"save_low_rank expects a transformers PreTrainedModel, got {type(model).__name__}")
    ranks = low_rank_modules(model)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in drop_tied_aliases(dict(model.state_dict()), model).items()}
    header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "ranks": ranks}

    def write(path: Path) -> None:
        save_file(tensors, os.fspath(path), metadata={"format": "pt", METADATA_KEY: json.dumps(header, sort_keys=True)})
        with open(path, "rb+") as fh:
            os.fsync(fh.fileno())

    write_checkpoint_folder(model, directory, WEIGHTS_NAME, write, tokenizer)
    path = Path(directory) / WEIGHTS_NAME
    return {"path": path, "file_bytes": path.stat().st_size, "ranks": ranks}


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (not a low-rank checkpoint folder)")
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for damaged files
        raise LowRankCheckpointError(path, f"not a readable safetensors file: {exc}") from None
    if METADATA_KEY not in metadata:
        raise LowRankCheckpointError(path, f"metadata missing: no {METADATA_KEY!r} entry, not a {FORMAT_NAME} checkpoint")
    try:
        header = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise LowRankCheckpointError(path, f"metadata {METADATA_KEY!r} is not valid JSON: {exc}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise LowRankCheckpointError(path, f"metadata names format {header!r:.80}, expected {FORMAT_NAME!r}")
    if header.get("version") != FORMAT_VERSION:
        raise LowRankCheckpointError(path, f"unsupported format version {header.get('version')!r} "
                                           f"(this prune_callbacks reads version {FORMAT_VERSION})")
    ranks = header.get("ranks")
    if not isinstance(ranks, dict) or not all(isinstance(k, str) and type(v) is int and v >= 1 for k, v in ranks.items()):
        raise LowRankCheckpointError(path, f"metadata 'ranks' must map module names to ranks >= 1, got {ranks!r:.80}")
    return ranks, tensors


def load_low_rank(directory, model_class=None):
    """Load a folder written by `save_low_rank` as the factorised model (eval mode, bitwise equal tensors).

    ``model_class``: a concrete or ``AutoModel*`` class; by default the one ``config.architectures`` names.
    Raises ``FileNotFoundError`` or `LowRankCheckpointError` (damaged file, unknown module, weights that
    do not match the model).
    """
    from transformers import AutoConfig

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory / 'config.json'}: no such file (not a checkpoint folder)")
    weights = directory / WEIGHTS_NAME
    ranks, state_dict = _read(weights)
    config = AutoConfig.from_pretrained(directory)
    try:
        cls = resolve_model_class(config, model_class)
    except ValueError as exc:
        raise LowRankCheckpointError(directory / "config.json", str(exc)) from None
    dtype = next((t.dtype for t in state_dict.values() if t.is_floating_point()), torch.float32)
    model = cls._from_config(config, dtype=dtype)
    for name, rank in ranks.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            linear = None
        if not isinstance(linear, torch.nn.Linear):
            raise LowRankCheckpointError(weights, f"ranks name {name!r}, which is not an nn.Linear of {cls.__name__}")
        _set_module(model, name, LowRankLinear(linear.in_features, linear.out_features, rank, linear.bias is not None,
                                               dtype=linear.weight.dtype))
    expected = model.state_dict()
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = sorted(set(expected) - set(state_dict) - tied)
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = sorted(k for k in set(state_dict) & set(expected) if state_dict[k].shape != expected[k].shape)
    problems = {kind: keys for kind, keys in (("missing", missing), ("unexpected", unexpected),
                                               ("mismatched", shapes)) if keys}
    if problems:
        raise LowRankCheckpointError(weights, f"weights do not match {cls.__name__} with these ranks: {problems}")
    model.load_state_dict(state_dict, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.eval()
    return model


def densify(src, dst) -> Path:
    """Write the low-rank checkpoint ``src`` as a plain ``save_pretrained`` folder ``dst`` (loads with
    ``from_pretrained``); other files of ``src`` (tokenizer, ...) are copied. Returns ``dst``."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and src.resolve() == dst.resolve():
        raise ValueError(f"densify needs a destination different from its source {src}")
    model = load_low_rank(src)
    densify_model(model)
    model.config.dtype = dtype_name(model.dtype)
    model.save_pretrained(dst)
    copy_side_files(src, dst)
    return dst
