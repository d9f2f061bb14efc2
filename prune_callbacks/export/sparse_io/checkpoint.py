"""Public entry points: save, load, inspect and densify sparse checkpoints.

A sparse checkpoint directory holds ``model.sparse.safetensors`` (see
:mod:`.format`), the model's ``config.json`` (plus ``generation_config.json``
for generative models) and, optionally, tokenizer files.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import torch

from prune_callbacks.export.sparse_io._hf import checkpoint_state_dict, resolve_model_class
from prune_callbacks.export.sparse_io.errors import SparseCheckpointError
from prune_callbacks.export.sparse_io.format import WEIGHTS_NAME, dtype_name
from prune_callbacks.export.sparse_io.reader import has_sparse_header, read_sparse_file
from prune_callbacks.export.sparse_io.writer import SparseSaveInfo, write_sparse_file

__all__ = ["save_sparse", "load_sparse", "densify", "read_sparse_state_dict", "is_sparse_checkpoint"]

_STAGING_PREFIX = ".sparse-tmp-"
# Weight files (dense or sparse, sharded or not); never copied over by ``densify``.
_WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


def _weights_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / WEIGHTS_NAME if path.is_dir() else path


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _save_side_files(model, staging: Path, tokenizer) -> None:
    config = copy.deepcopy(model.config)
    config.dtype = dtype_name(model.dtype)  # as save_pretrained does
    config.architectures = [type(model).__name__]
    config.save_pretrained(staging)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(staging)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)


def save_sparse(model, directory, tokenizer=None, *, min_saving: float = 0.0) -> SparseSaveInfo:
    """Save a (pruned) ``transformers`` model as a sparse checkpoint.

    Everything is first written to a staging folder inside ``directory`` and
    then moved into place with ``os.replace`` (side files first, the weights
    file last), so a failure while writing leaves an existing checkpoint
    untouched.

    Args:
        model: a ``transformers.PreTrainedModel``.
        directory: target folder (created if needed).
        tokenizer: optional object with ``save_pretrained`` (tokenizer/processor).
        min_saving: compress a tensor only if that saves at least this fraction
            of its dense bytes (``0.0``: whenever it saves any byte).

    Returns:
        A :class:`SparseSaveInfo` with the file's path and byte counts.
    """
    if not 0.0 <= min_saving < 1.0:
        raise ValueError(f"min_saving must be in [0, 1), got {min_saving}")
    if not hasattr(model, "config") or not hasattr(model, "state_dict"):
        raise TypeError(f"save_sparse expects a transformers PreTrainedModel, got {type(model).__name__}")
    state_dict = checkpoint_state_dict(model)
    info = write_checkpoint_folder(model, directory, WEIGHTS_NAME,
                                   lambda path: write_sparse_file(state_dict, path, min_saving=min_saving), tokenizer)
    return dataclasses.replace(info, path=Path(directory) / WEIGHTS_NAME)


def write_checkpoint_folder(model, directory, weights_name: str, write_weights, tokenizer=None):
    """Write a checkpoint folder atomically: ``write_weights(path)`` writes (and fsyncs) the weights file into a
    staging folder inside ``directory``, the side files (config, generation config, tokenizer) go beside it, then
    everything is moved into place with ``os.replace``, the weights file last, so a failure while writing leaves
    an existing checkpoint untouched. Returns what ``write_weights`` returned. Shared with
    :mod:`prune_callbacks.export.low_rank.checkpoint`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=directory))
    try:
        info = write_weights(staging / weights_name)
        _save_side_files(model, staging, tokenizer)
        for item in sorted(staging.iterdir()):
            if item.name == weights_name:
                continue
            target = directory / item.name
            if item.is_dir():
                shutil.copytree(item, target, dirs_exist_ok=True)
            else:
                os.replace(item, target)
        os.replace(staging / weights_name, directory / weights_name)
        _fsync_dir(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return info


def read_sparse_state_dict(path) -> dict[str, torch.Tensor]:
    """Dense state dict of a sparse checkpoint (a directory or the file itself).

    Tied aliases are absent, as in a ``save_pretrained`` checkpoint.
    Raises ``FileNotFoundError`` or :class:`SparseCheckpointError`.
    """
    return read_sparse_file(_weights_file(path))


def is_sparse_checkpoint(directory) -> bool:
    """True when ``directory`` (or a file path) holds a readable sparse checkpoint header."""
    path = _weights_file(directory)
    return path.is_file() and has_sparse_header(path)


def load_sparse(directory, model_class=None, torch_dtype=None):
    """Load a sparse checkpoint as an ordinary ``transformers`` model in eval mode.

    Args:
        directory: folder written by :func:`save_sparse`.
        model_class: concrete model class or ``AutoModel*`` class; by default
            the class named in ``config.architectures``.
        torch_dtype: dtype to load in; by default the saved one (bitwise equal
            weights).

    Raises:
        FileNotFoundError: no ``config.json`` or weights file.
        SparseCheckpointError: unreadable weights, or weights that do not
            match the model (missing keys other than re-tied weights,
            unexpected or mis-shaped keys).
    """
    from transformers import AutoConfig

    directory = Path(directory)
    weights = directory / WEIGHTS_NAME
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory / 'config.json'}: no such file (not a checkpoint folder)")
    state_dict = read_sparse_file(weights)
    config = AutoConfig.from_pretrained(directory)
    try:
        cls = resolve_model_class(config, model_class)
    except ValueError as exc:
        raise SparseCheckpointError(directory / "config.json", str(exc)) from None
    model, info = cls.from_pretrained(
        None,
        config=config,
        state_dict=state_dict,
        dtype="auto" if torch_dtype is None else torch_dtype,
        output_loading_info=True,
    )
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    problems = {
        "missing": sorted(set(info.get("missing_keys", ())) - tied),
        "unexpected": sorted(info.get("unexpected_keys", ())),
        "mismatched": sorted(str(k) for k in info.get("mismatched_keys", ())),
        "errors": list(info.get("error_msgs", ())),
    }
    problems = {kind: keys for kind, keys in problems.items() if keys}
    if problems:
        raise SparseCheckpointError(weights, f"weights do not match {cls.__name__}: {problems}")
    model.eval()
    return model


def densify(src, dst) -> Path:
    """Write the sparse checkpoint ``src`` as a standard ``save_pretrained`` folder.

    Other files of ``src`` (tokenizer, README, ...) are copied, except weight
    files and anything ``save_pretrained`` already wrote. Returns ``dst``.
    """
    src, dst = Path(src), Path(dst)
    if dst.exists() and src.resolve() == dst.resolve():
        raise ValueError(f"densify needs a destination different from its source {src}")
    model = load_sparse(src)
    model.save_pretrained(dst)
    copy_side_files(src, dst)
    return dst


def copy_side_files(src, dst) -> None:
    """Copy ``src``'s other files (tokenizer, README, ...) into ``dst``: not weight files, staging folders, or
    anything ``dst`` already has. Shared with :mod:`prune_callbacks.export.low_rank.checkpoint`."""
    src, dst = Path(src), Path(dst)
    for item in sorted(src.iterdir()):
        skip = item.name.endswith(_WEIGHT_FILE_SUFFIXES) or item.name.startswith(_STAGING_PREFIX)
        if item.is_file() and not skip and not (dst / item.name).exists():
            shutil.copy2(item, dst / item.name)
