"""Which weights get pruned.

Default: the ``weight`` of every ``nn.Linear`` (or GPT-2 style ``Conv1D``)
inside the model's repeated blocks, i.e. whose module name has a numeric path
component (``encoder.layer.3.attention.self.query``, ``model.layers.0.mlp.up_proj``).
Embeddings, poolers, classifiers and LM heads sit outside the blocks and are
left alone. A weight that shares its storage with another parameter (tied
embeddings) is never pruned: zeroing it would zero the embedding too.

``include`` / ``exclude`` are regular expressions matched with ``re.search``
against module names.

Frozen weights (``requires_grad=False`` when the `Pruner` is built) are not
targets: they never receive a gradient, so every gradient saliency would score
them zero and prune them first. `drop_frozen` removes them with one log line
naming them, and refuses when nothing trainable is left.
"""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn

from prune_callbacks.core.peft_support import refuse_adapter_models

#: a numeric path component (``encoder.layer.3.attention``: ``3``): the one parser of block indices in names
BLOCK_INDEX = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")


def block_index(name: str) -> Optional[tuple[str, int, str]]:
    """``(prefix, index, rest)`` of the first numeric component followed by more of the name
    (``encoder.layer.3.attention.self.query`` -> ``("encoder.layer", 3, "attention.self.query")``); None if none."""
    for match in BLOCK_INDEX.finditer(name):
        if match.end() < len(name):
            return name[:match.start()], int(match.group(1)), name[match.end() + 1:]
    return None


def group_name(name: str) -> str:
    """``encoder.layer.3.attention.self.query`` -> ``encoder.layer.*.attention.self.query`` (every numeric
    component after the first character; a leading one, e.g. ``nn.Sequential``'s ``0``, stays)."""
    return BLOCK_INDEX.sub(lambda m: ".*" if m.start() > 0 else m.group(0), name)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """One prunable weight: ``module_name`` and its ``weight`` parameter."""

    name: str  # module name, e.g. "encoder.layer.0.attention.self.query"
    param: nn.Parameter
    transposed: bool = False  # GPT-2's Conv1D stores [in, out]; nn.Linear stores [out, in]

    @property
    def param_name(self) -> str:
        return f"{self.name}.weight"

    @property
    def numel(self) -> int:
        return self.param.numel()


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / torch.compile wrappers so names match the bare model."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def is_transposed(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D`` stores its weight as ``[in, out]`` (the one place that recognises it)."""
    return type(module).__name__ == "Conv1D"


def is_linear_like(module: nn.Module) -> bool:
    """An ``nn.Linear`` or a GPT-2 ``Conv1D`` with a 2-D weight: what can be a target."""
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return is_transposed(module) and isinstance(weight, nn.Parameter) and weight.dim() == 2


def _storage_key(param: torch.Tensor) -> tuple:
    """What identifies a parameter's memory; sharded (DTensor) and meta tensors fall back to identity."""
    if param.device.type == "meta" or type(param.data).__name__ == "DTensor":
        return ("object", id(param))
    try:
        return (param.device, param.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):
        return ("object", id(param))


def _tied_parameters(model: nn.Module) -> dict[str, str]:
    """Map each parameter name that shares storage with another parameter to that other name."""
    by_storage: dict[tuple, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for pname, param in module.named_parameters(recurse=False, remove_duplicate=False):
            full = f"{module_name}.{pname}" if module_name else pname
            key = _storage_key(param)
            by_storage.setdefault(key, []).append(full)
    tied = {}
    for names in by_storage.values():
        if len(names) > 1:
            for name in names:
                tied[name] = next(n for n in names if n != name)
    return tied


def find_targets(
    model: nn.Module,
    include: Optional[Iterable[str]] = None,
    exclude: Iterable[str] = (),
) -> list[Target]:
    """Select the weights to prune, raising ``ValueError`` for patterns that match nothing."""
    model = unwrap_model(model)
    refuse_adapter_models(model)  # PEFT-wrapped models: see peft_support.py
    linear_names = [name for name, module in model.named_modules() if name and is_linear_like(module)]
    all_names = [name for name, _ in model.named_modules() if name]
    include = list(include) if include is not None else None
    exclude = list(exclude)

    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module (the model to prune), got {type(model).__name__}: {model!r:.80}")
    problems = []
    if include is None:
        chosen = [name for name in linear_names if BLOCK_INDEX.search(name)]
    else:
        chosen = []
        for pattern in include:
            hits = [name for name in linear_names if re.search(pattern, name)]
            if not hits:
                problems.append(_no_match_message("include", pattern, linear_names or all_names))
            chosen.extend(h for h in hits if h not in chosen)
    before_exclude = list(chosen)
    for pattern in exclude:
        if not any(re.search(pattern, name) for name in chosen):
            problems.append(_no_match_message("exclude", pattern, chosen or linear_names))
        chosen = [name for name in chosen if not re.search(pattern, name)]
    if problems:
        raise ValueError("target patterns do not fit this model:\n" + "\n".join(problems))

    tied = _tied_parameters(model)
    explicitly_tied = [f"{n}.weight (tied to {tied[n + '.weight']})" for n in chosen if f"{n}.weight" in tied]
    if explicitly_tied and include is not None:
        raise ValueError(
            "include selects weights tied to other parameters; pruning them would also prune what they are tied to "
            f"(e.g. the embeddings): {', '.join(explicitly_tied)}. Add an exclude pattern for them."
        )
    modules = dict(model.named_modules())
    targets = [Target(name, modules[name].weight, is_transposed(modules[name]))
               for name in chosen if f"{name}.weight" not in tied]
    if not targets and before_exclude and not chosen:
        raise ValueError(
            f"no prunable weights left: exclude={exclude!r} removed every candidate ({_preview(before_exclude)}); "
            "narrow the exclude patterns"
        )
    if not targets and chosen:
        raise ValueError(
            "no prunable weights left: every selected weight is tied to another parameter (e.g. the embeddings), "
            f"and pruning it would prune that too: {_preview([f'{n}.weight' for n in chosen])}"
        )
    if not targets:
        raise ValueError(
            "no prunable weights found: the default targets are the nn.Linear layers inside numbered blocks "
            f"(found linear layers: {_preview(linear_names)}); pass include=[...] patterns"
        )
    return targets


def _no_match_message(field: str, pattern: str, names: list[str]) -> str:
    close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.3)
    if not close:
        stem = re.sub(r"[^a-zA-Z_]", " ", pattern).split()
        close = [n for n in names if any(s in n for s in stem)][:5]
    hint = f"close module names: {', '.join(close)}" if close else f"module names look like: {_preview(names)}"
    return f"  {field} pattern {pattern!r} matches no module; {hint}"


def _preview(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "") if names else "(none)"


def frozen(targets: Iterable[Target]) -> list[Target]:
    """The targets whose weight is frozen (``requires_grad=False``): they never receive a gradient."""
    return [t for t in targets if not t.param.requires_grad]


def drop_frozen(targets: list[Target], what: str = "pruning") -> list[Target]:
    """``targets`` without the frozen ones, logged in one line; ``ValueError`` if none is left."""
    out = frozen(targets)
    if not out:
        return targets
    names = [t.param_name for t in out]
    if len(out) == len(targets):
        raise ValueError(
            f"every selected weight has requires_grad=False (frozen), so no gradient can score it and {what} has "
            f"nothing to act on: {_preview(names)}. Unfreeze the weights to prune, or select trainable ones with "
            "include=[...]"
        )
    logger.warning("prune_callbacks: %d frozen weights (requires_grad=False) are not %s targets: %s",
                len(out), what, _preview(names, 12))
    return [t for t in targets if t.param.requires_grad]


def target_numel(targets: Iterable[Target]) -> int:
    return sum(t.numel for t in targets)


def check_not_sharded(targets: Iterable[Target]) -> None:
    """Refuse sharded parameters (DTensor / FSDP flat params) for the L1 step (`L1Config`), which does not follow
    shards yet; pruning groups accept FSDP2 shards (see :mod:`prune_callbacks.methods.sharding`)."""
    offenders = [t.param_name for t in targets if type(t.param.data).__name__ == "DTensor" or t.param.dim() < 2]
    if offenders:
        raise NotImplementedError(
            "L1Config does not support sharded or flattened weights (FSDP / DeepSpeed ZeRO-3) yet: "
            f"{_preview(offenders)}. Use DDP or ZeRO stage 1/2 for the L1 step, or leave it out."
        )

