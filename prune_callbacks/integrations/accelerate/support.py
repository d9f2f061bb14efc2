"""Accelerate plumbing of `AcceleratePruningHook`: which setups are supported, and step counting.

No import of accelerate here: the checks read the accelerator's state duck-typed.
"""

from __future__ import annotations

import math
from typing import Any


def count_optimizer_steps(num_batches: int, gradient_accumulation_steps: int = 1, epochs: int = 1) -> int:
    """Optimizer steps of a run over a prepared dataloader of ``num_batches`` batches per process.

    Accelerate syncs at the end of each epoch's dataloader even when the last
    accumulation window is short, so an epoch has ``ceil(num_batches / accum)`` steps.
    (Steps skipped by an fp16 ``GradScaler`` are not taken and do not count.)
    """
    if num_batches < 0 or gradient_accumulation_steps < 1 or epochs < 0:
        raise ValueError(
            f"count_optimizer_steps(num_batches={num_batches}, gradient_accumulation_steps={gradient_accumulation_steps}, "
            f"epochs={epochs}): need num_batches >= 0, gradient_accumulation_steps >= 1, epochs >= 0"
        )
    return math.ceil(num_batches / gradient_accumulation_steps) * epochs


def _value(x: Any) -> Any:
    """An enum's value (DistributedType is a str enum), or ``x`` itself."""
    return getattr(x, "value", x)


def _get(obj: Any, *names: str) -> Any:
    """``obj.a.b...`` or None when any link is missing (works on stubs)."""
    for name in names:
        try:
            obj = getattr(obj, name)
        except Exception:  # properties of a half-initialised state may raise
            return None
        if obj is None:
            return None
    return obj


def check_accelerator_supported(accelerator: Any) -> None:
    """Raise ``NotImplementedError`` for setups where correct global masks cannot be computed.

    Reads ``distributed_type`` and the FSDP / DeepSpeed / parallelism settings of
    ``accelerator`` (or of its ``state``); see the module docstring for why each is refused.
    """
    state = getattr(accelerator, "state", None)
    dtype = _value(getattr(accelerator, "distributed_type", None) or getattr(state, "distributed_type", None))
    dtype = str(dtype).upper() if dtype is not None else "NO"
    fsdp_plugin = _get(state, "fsdp_plugin") or _get(accelerator, "fsdp_plugin")
    ds_plugin = _get(state, "deepspeed_plugin") or _get(accelerator, "deepspeed_plugin")
    pconf = _get(accelerator, "parallelism_config") or _get(state, "parallelism_config")

    if dtype == "FSDP" or fsdp_plugin is not None:
        version = _get(fsdp_plugin, "fsdp_version")
        raise NotImplementedError(
            f"AcceleratePruningHook does not support Accelerate's FSDP plugin{'' if version is None else f' (fsdp_version={version})'}: "
            "it is not wired and could not be tested, since Accelerate (1.16, accelerate/state.py, "
            "AcceleratorState.__init__) switches to DistributedType.FSDP only for GPU-type backends (MULTI_GPU, "
            "MULTI_NPU, MULTI_XPU, ...), never for MULTI_CPU. Shard the model yourself with "
            "torch.distributed.fsdp.fully_shard (FSDP2), prepare only the optimizer (and dataloader), and register "
            "this hook (docs/sharded-training.md); or launch with DDP (`accelerate launch --multi_gpu`, no FSDP plugin). "
            "FSDP1 (flattened FlatParameters) is not supported in any form."
        )
    if dtype == "DEEPSPEED" or ds_plugin is not None:
        stage = _get(ds_plugin, "zero_stage")
        why = (
            "ZeRO-3 shards every parameter across processes, so global masks cannot be computed from the local shard"
            if stage == 3
            else "the DeepSpeed engine steps its own optimizer over flattened fp32 master partitions (the loop's "
            "optimizer.step() is a no-op), so the pruner cannot hook real steps and masks written into the model "
            "would be overwritten by the master weights"
        )
        raise NotImplementedError(
            f"AcceleratePruningHook does not support DeepSpeed{'' if stage is None else f' ZeRO stage {stage}'}: {why}. "
            "Launch with DDP (`accelerate launch --multi_gpu`, no DeepSpeed config) instead."
        )
    if dtype == "MEGATRON_LM":
        raise NotImplementedError(
            "AcceleratePruningHook does not support Megatron-LM: it owns the optimizer step and shards weights "
            "(tensor parallelism), so global masks cannot be computed. Use DDP."
        )
    if pconf is not None:
        sharded = [name for name in ("tp", "dp_shard") if bool(_get(pconf, f"{name}_enabled"))]
        if sharded:
            raise NotImplementedError(
                f"AcceleratePruningHook does not support parallelism_config with {' and '.join(sharded)} enabled: "
                "weights are sharded (DTensor) across processes, so global masks cannot be computed. Use plain "
                "data parallelism (DDP)."
            )

