"""Pruning state on disk: one safetensors file beside a checkpoint's weights.

Tensors (masks as bool, saliency buffers as float32, a granularity's own state) go in
the tensor section under ``masks/<target>``, ``saliency/<buffer>/<target>`` and
``granularity/<name>``; counters and the
config go in the string metadata as JSON. No pickle: loading cannot run code.

`write_atomic` / `save_tensors_atomic` are the one writer of the state files (the pruner's here, the
accuracy guard's ``guard_state.safetensors``, a distillation teacher's snapshot): a temporary name
beside the target, fsync'd, then renamed over it, so a crash or a full disk never leaves a
half-written state where a good one was. `STATE_FILE` is the one name of the pruner's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional, Union

import torch

STATE_FILE = "pruning_state.safetensors"
_META_KEY = "prune_callbacks.state"


def write_atomic(path: Union[str, os.PathLike], write: Callable[[str], None]) -> Path:
    """Call ``write(temporary path)``, fsync that file, then rename it to ``path``; the temporary file is
    removed if anything fails. Returns ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(str(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_tensors_atomic(tensors: dict, path: Union[str, os.PathLike], metadata: Optional[dict] = None) -> Path:
    """``safetensors.torch.save_file`` through `write_atomic`."""
    from safetensors.torch import save_file

    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_state_file(state: dict, path: Union[str, os.PathLike]) -> Path:
    """Write ``Pruner.state_dict()`` to ``path`` atomically (`save_tensors_atomic`)."""
    path = Path(path)
    tensors = {f"masks/{n}": m.contiguous().cpu() for n, m in state["masks"].items()}
    for buffer, per_target in state["saliency"].items():
        tensors.update({f"saliency/{buffer}/{n}": t.contiguous().cpu() for n, t in per_target.items()})
    tensors.update({f"granularity/{n}": t.contiguous().cpu() for n, t in (state.get("granularity") or {}).items()})
    meta = {k: v for k, v in state.items() if k not in ("masks", "saliency", "granularity")}
    meta["saliency_buffers"] = sorted(state["saliency"])
    return save_tensors_atomic(tensors, path, metadata={_META_KEY: json.dumps(meta)})


def load_state_file(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu") -> dict:
    """Read a file written by `save_state_file` back into a ``Pruner.state_dict()``-shaped dict."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no pruning state at {path}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            raw_meta = (f.metadata() or {}).get(_META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for damaged files
        raise ValueError(f"{path} is not a readable pruning state file: {exc}") from None
    if raw_meta is None:
        raise ValueError(f"{path} is a safetensors file but holds no prune_callbacks state (metadata key missing)")
    state = json.loads(raw_meta)
    buffers = state.pop("saliency_buffers")
    state["masks"] = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("masks/")}
    state["granularity"] = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("granularity/")}
    state["saliency"] = {
        b: {k.split("/", 2)[2]: v for k, v in tensors.items() if k.startswith(f"saliency/{b}/")} for b in buffers
    }
    return state
