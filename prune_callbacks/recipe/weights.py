"""Read the weights of anything a user may point ``prune-callbacks report`` at.

* a ``save_pretrained`` directory: ``model.safetensors``, sharded safetensors
  with ``model.safetensors.index.json``, or ``pytorch_model.bin`` (also
  sharded), the latter read with ``torch.load(weights_only=True)``;
* a single weights file (``.safetensors``, ``.bin``, ``.pt``, ``.pth``);
* a sparse checkpoint written by :mod:`prune_callbacks.export.sparse_io`;
* a Trainer ``checkpoint-N/`` directory, whose ``pruning_state.safetensors``
  (step, mask sparsity, target) is read too.

A damaged file is an error naming it and what is wrong (``config.json`` or ``trainer_state.json``
that is not a JSON object included): a report never describes a folder that would not load.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from prune_callbacks.core.state_io import STATE_FILE, load_state_file

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class WeightsError(ValueError):
    """The path holds no weights this command can read."""


@dataclass
class LoadedWeights:
    tensors: dict[str, torch.Tensor]
    kind: str  # safetensors | sharded-safetensors | pytorch-bin | sharded-pytorch-bin | sparse
    files: list[Path]
    pruning_state: Optional[dict] = None
    extra: dict = field(default_factory=dict)

    @property
    def bytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises several types for damaged files
            raise WeightsError(f"{path} is not a readable safetensors file: {exc}") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip errors, or objects weights_only refuses
        raise WeightsError(f"{path} cannot be read with torch.load(weights_only=True): {exc}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return obj


def _sharded(directory: Path, index_name: str) -> tuple[dict[str, torch.Tensor], list[Path]]:
    try:
        index = json.loads((directory / index_name).read_text(encoding="utf-8"))
        shards = sorted(set(index.get("weight_map", {}).values()))
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise WeightsError(f"{directory / index_name} is damaged (not a shard index: {exc}); expected JSON with a "
                           "weight_map of tensor name -> shard file") from None
    if not shards:
        raise WeightsError(f"{directory / index_name} lists no shard in its weight_map")
    tensors: dict[str, torch.Tensor] = {}
    files = []
    for shard in shards:
        path = directory / shard
        if not path.is_file():
            raise WeightsError(f"shard {shard} listed in {index_name} is missing from {directory}")
        tensors.update(_load_file(path))
        files.append(path)
    return tensors, files


def _is_sparse(path: Path) -> bool:
    try:
        from prune_callbacks.export.sparse_io import is_sparse_checkpoint
    except ImportError:  # sparse_io not installed in this build
        return False
    return is_sparse_checkpoint(path)


def _sparse_damage(path: Path) -> str:
    """What is wrong with a sparse weights file whose header does not read back."""
    from prune_callbacks.export.sparse_io import SparseCheckpointError, read_sparse_state_dict

    size = path.stat().st_size
    try:
        read_sparse_state_dict(path)
    except SparseCheckpointError as exc:
        return exc.problem
    except Exception as exc:  # anything the reader did not anticipate in a broken file
        return f"{type(exc).__name__}: {exc}"
    return f"its header is not a sparse checkpoint header ({size} bytes)"


def _read_sparse(path: Path) -> dict[str, torch.Tensor]:
    from prune_callbacks.export.sparse_io import SparseCheckpointError, read_sparse_state_dict

    try:
        return read_sparse_state_dict(path)
    except SparseCheckpointError as exc:
        raise WeightsError(str(exc)) from None


def load_weights(path: "str | os.PathLike") -> LoadedWeights:
    """Tensors (and any pruning state) of ``path``; raises WeightsError / FileNotFoundError."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix not in WEIGHT_SUFFIXES:
            raise WeightsError(f"{path} is not a weights file; allowed: {', '.join(WEIGHT_SUFFIXES)} files or a model directory")
        if path.suffix == ".safetensors" and _is_sparse(path):
            return LoadedWeights(_read_sparse(path), "sparse", [path])
        kind = "safetensors" if path.suffix == ".safetensors" else "pytorch-bin"
        return LoadedWeights(_load_file(path), kind, [path])

    state = None
    if (path / STATE_FILE).is_file():
        try:
            state = load_state_file(path / STATE_FILE)
        except (ValueError, KeyError, TypeError) as exc:  # damaged file, or metadata that is not a pruning state
            detail = str(exc).removeprefix(f"{path / STATE_FILE} ").removeprefix("is ")
            raise WeightsError(f"{path / STATE_FILE} is damaged ({detail}); the pruning state cannot be read "
                               "(resume from an earlier checkpoint, or delete the file to report the weights only)") from None
    from prune_callbacks.export.sparse_io.format import WEIGHTS_NAME

    if (path / WEIGHTS_NAME).is_file() and not _is_sparse(path):
        raise WeightsError(f"{path / WEIGHTS_NAME} is a damaged sparse checkpoint: {_sparse_damage(path / WEIGHTS_NAME)}")
    if _is_sparse(path):
        loaded = LoadedWeights(_read_sparse(path), "sparse", [path / WEIGHTS_NAME])
    elif (path / "model.safetensors").is_file():
        loaded = LoadedWeights(_load_file(path / "model.safetensors"), "safetensors", [path / "model.safetensors"])
    elif (path / "model.safetensors.index.json").is_file():
        tensors, files = _sharded(path, "model.safetensors.index.json")
        loaded = LoadedWeights(tensors, "sharded-safetensors", files)
    elif (path / "pytorch_model.bin").is_file():
        loaded = LoadedWeights(_load_file(path / "pytorch_model.bin"), "pytorch-bin", [path / "pytorch_model.bin"])
    elif (path / "pytorch_model.bin.index.json").is_file():
        tensors, files = _sharded(path, "pytorch_model.bin.index.json")
        loaded = LoadedWeights(tensors, "sharded-pytorch-bin", files)
    else:
        raise WeightsError(
            f"{path} holds no model weights; expected model.safetensors, model.safetensors.index.json, "
            "pytorch_model.bin(.index.json) or a sparse checkpoint (model.sparse.safetensors)")
    loaded.pruning_state = state
    trainer_state = path / "trainer_state.json"
    if trainer_state.is_file():
        loaded.extra["global_step"] = _json_object(trainer_state).get("global_step")
    if (path / "config.json").is_file():
        _json_object(path / "config.json")
    return loaded


def _json_object(path: Path) -> dict:
    """A JSON file beside the weights that must be a JSON object; WeightsError naming the file and the damage."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise WeightsError(f"{path} is damaged: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{path} is damaged: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                           "the folder's weights may be fine, but it does not load as a model or checkpoint") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path} is damaged: not valid JSON for this file (a {type(data).__name__}, expected an "
                           "object)")
    return data


def pruning_state_summary(state: Optional[dict]) -> Optional[dict]:
    """The human-relevant part of a pruning state: step, mask sparsity, the run's target."""
    if not state:
        return None
    config = state.get("config") or {}
    masks = state.get("masks") or {}
    pruned = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    return {
        "step": state.get("step"),
        "mask_sparsity": state.get("mask_sparsity"),
        "final_sparsity": config.get("final_sparsity"),
        "mask_updates": state.get("mask_updates"),
        "finalized": state.get("finalized"),
        "targets": len(masks),
        "masked_fraction": pruned / total if total else 0.0,
    }
