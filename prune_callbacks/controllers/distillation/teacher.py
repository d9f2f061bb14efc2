"""The frozen teacher: snapshot, loading, compatibility checks, exact save / restore.

A teacher is an ordinary module in eval mode whose parameters do not require
grad; it is never registered as a submodule of the student, so it is not in the
optimizer, not in DDP's buckets, not in the student's ``state_dict`` and not in
``save_pretrained``. Its memory is `module_bytes` (a full copy of the student,
halved with ``teacher_dtype``).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from prune_callbacks.core.state_io import write_atomic
from prune_callbacks.core.targets import unwrap_model
from prune_callbacks.controllers.distillation.config import DistillationConfig, DistillationConfigError


def snapshot_step(pruning: Any) -> int:
    """The step a ``"before_pruning"`` snapshot is taken after: one before the first optimizer step whose
    hook computes masks (`Pruner.last_dense_step`, one source; ``pruning`` is a `Pruner` or anything with
    ``first_update_step``, e.g. the Trainer engine). An error when nothing is ever pruned."""
    step = _last_dense_step(pruning)
    if step is None:
        raise DistillationConfigError("snapshot='before_pruning': the pruning config never updates masks "
                                      "(no pruning group, L1 only); use snapshot='train_begin'")
    return step


def _last_dense_step(pruning: Any) -> Optional[int]:
    if hasattr(pruning, "last_dense_step"):
        return pruning.last_dense_step()
    from prune_callbacks.engine.pruner import Pruner

    return Pruner.last_dense_step(pruning)  # duck-typed: only first_update_step is read


TEACHER_FILE = "distillation_teacher.safetensors"
_META_KEY = "prune_callbacks.teacher"
_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


def freeze(module: nn.Module, dtype: Optional[str] = None) -> nn.Module:
    """Eval mode, no grads, optionally cast; returns ``module``."""
    if _DTYPES[dtype] is not None:
        module.to(_DTYPES[dtype])
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
        p.grad = None
    return module


def snapshot(student: nn.Module, dtype: Optional[str] = None) -> nn.Module:
    """A frozen deep copy of the (unwrapped) student as it is now.

    An instance-level ``forward`` (Accelerate's autocast wrapper, or the distillation patch
    itself) is left out of the copy: the teacher runs its class's plain ``forward``.
    """
    bare = unwrap_model(student)
    check_copyable(bare)
    own_forward = bare.__dict__.pop("forward", None)
    try:
        with torch.no_grad():
            teacher = copy.deepcopy(bare)
    finally:
        if own_forward is not None:
            bare.__dict__["forward"] = own_forward
    teacher.__dict__.pop("_original_forward", None)
    return freeze(teacher, dtype)


def check_copyable(student: nn.Module) -> None:
    """Raise `DistillationConfigError` when a ``"self"`` teacher cannot be copied from ``student``: its weights
    are sharded (FSDP2 ``fully_shard``: DTensor parameters), which FSDP2 refuses to deep-copy, and each rank
    holds only its rows. The user builds the teacher instead and passes it as a module."""
    from prune_callbacks.methods.sharding import is_sharded

    sharded = [n for n, p in unwrap_model(student).named_parameters() if is_sharded(p)]
    if sharded:
        raise DistillationConfigError(
            f"teacher='self' cannot copy a sharded student ({sharded[0]} is a DTensor: FSDP2 / fully_shard): FSDP2 "
            "modules cannot be deep-copied and each rank holds only its rows. Build the teacher yourself on every "
            "rank (the same model loaded again, or a fine-tuned dense one), shard it with fully_shard like the "
            "student, and pass it as DistillationConfig(teacher=<that module>)"
        )


def load_from_path(student: nn.Module, path: Union[str, os.PathLike], dtype: Optional[str] = None) -> nn.Module:
    """``type(student).from_pretrained(path)``, frozen, on the student's device."""
    bare = unwrap_model(student)
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise DistillationConfigError(f"teacher={path!r} is invalid: no such folder")
    loader = getattr(type(bare), "from_pretrained", None)
    if loader is None:
        raise DistillationConfigError(
            f"teacher={path!r}: a teacher path needs a Hugging Face model (the student, {type(bare).__name__}, "
            "has no from_pretrained); pass the teacher as an nn.Module instead"
        )
    try:
        teacher = loader(path)
    except Exception as exc:  # noqa: BLE001 - any loading failure is a config error for the user
        raise DistillationConfigError(f"teacher={path!r} could not be loaded as {type(bare).__name__}: {exc}") from None
    return freeze(teacher.to(_device_of(bare)), dtype)


def resolve(config: DistillationConfig, student: nn.Module) -> Optional[nn.Module]:
    """The teacher for ``config`` now: loaded / frozen for a path or module, a snapshot for
    ``"self"`` at ``train_begin``, None for a ``"self"`` teacher taken later. Checked against the student."""
    if config.self_teacher:
        check_copyable(student)  # before any compute, also for a "before_pruning" snapshot taken later
        return snapshot(student, config.teacher_dtype) if config.snapshot == "train_begin" else None
    if isinstance(config.teacher, str):
        teacher = load_from_path(student, config.teacher, config.teacher_dtype)
    else:
        teacher = freeze(unwrap_model(config.teacher), config.teacher_dtype)
    check_compatible(student, teacher, hidden=config.hidden_weight > 0, name=repr(config.teacher))
    return teacher


def check_compatible(student: nn.Module, teacher: nn.Module, *, hidden: bool = False, name: str = "teacher") -> None:
    """Raise `DistillationConfigError` before any compute when the teacher's outputs cannot be compared
    with the student's: another vocabulary, number of labels, or (``hidden``) depth / width."""
    s_cfg, t_cfg = getattr(unwrap_model(student), "config", None), getattr(teacher, "config", None)
    if s_cfg is None or t_cfg is None:
        return  # not HF models: shapes are checked at the first loss
    fields = ["vocab_size"]
    bare = unwrap_model(student)
    is_lm = callable(getattr(bare, "get_output_embeddings", None)) and bare.get_output_embeddings() is not None
    if not is_lm:
        fields.append("num_labels")
    if hidden:
        fields += ["num_hidden_layers", "hidden_size"]
    for field in fields:
        s, t = getattr(s_cfg, field, None), getattr(t_cfg, field, None)
        if s is not None and t is not None and s != t:
            raise DistillationConfigError(
                f"teacher={name} does not fit the student: teacher {field}={t!r}, student {field}={s!r} "
                f"(distillation needs the same {field}" + (", hidden_weight > 0 needs equal depth and width" if hidden
                                                           and field in ("num_hidden_layers", "hidden_size") else "")
                + ")"
            )


def module_bytes(module: nn.Module) -> int:
    """Bytes of the module's parameters and buffers (shared storage counted once)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


# ------------------------------------------------------------------ exact save / restore
def save_teacher(teacher: nn.Module, path: Union[str, os.PathLike], *, meta: Optional[dict] = None) -> Path:
    """Write the teacher's weights (safetensors, tied weights once) atomically; ``meta`` goes in the metadata."""
    from safetensors.torch import save_model

    path = Path(path)
    write_atomic(path, lambda tmp: save_model(teacher, tmp, metadata={_META_KEY: json.dumps(meta or {})}))
    return path


def read_meta(path: Union[str, os.PathLike]) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get(_META_KEY, "{}"))


def restore_teacher(student: nn.Module, path: Union[str, os.PathLike], dtype: Optional[str] = None) -> nn.Module:
    """A ``"self"`` teacher rebuilt from `save_teacher`'s file: the student's structure, the saved
    weights bit for bit (not a new snapshot of the student, which may be pruned by now)."""
    from safetensors.torch import load_model

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no distillation teacher at {path}")
    teacher = snapshot(student, dtype)  # structure (and dtype) only; every tensor is overwritten below
    try:
        missing, unexpected = load_model(teacher, str(path), strict=True, device=str(_device_of(teacher)))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types
        raise ValueError(f"{path} does not hold a teacher for this model: {exc}") from None
    return freeze(teacher)
