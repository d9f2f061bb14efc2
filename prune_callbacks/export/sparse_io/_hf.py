"""Glue to ``transformers``: which state dict to save, which class to build.

The saved state dict is the one ``PreTrainedModel.save_pretrained`` would write:
aliases of tied weights removed (one name kept per shared storage) and weight
renamings/conversions reverted to the checkpoint ("original") layout. Loading
goes through ``from_pretrained(None, config=..., state_dict=...)``, which builds
the model on the meta device, applies the forward conversions, assigns the
tensors and re-ties the tied weights, exactly as for a normal checkpoint.
"""

from __future__ import annotations

import collections
import re

import torch

try:  # transformers >= 5
    from transformers.modeling_utils import remove_tied_weights_from_state_dict as _hf_remove_tied
except ImportError:  # pragma: no cover - exercised through a monkeypatched test
    _hf_remove_tied = None
try:  # transformers >= 5
    from transformers.core_model_loading import revert_weight_conversion as _hf_revert
except ImportError:  # pragma: no cover
    _hf_revert = None

__all__ = ["checkpoint_state_dict", "resolve_model_class", "drop_tied_aliases"]


def _tied_patterns(model) -> list[str]:
    patterns: list[str] = []
    for prefix, module in model.named_modules():
        tied = getattr(module, "_tied_weights_keys", None) or []
        patterns += [f"{prefix}.{key}" if prefix else key for key in tied]
    return patterns


def drop_tied_aliases(state_dict: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """Keep one name per group of tensors that alias the same memory.

    Fallback for transformers versions without ``remove_tied_weights_from_state_dict``:
    within a group of identical views, names matching the model's
    ``_tied_weights_keys`` (the tie *targets*, e.g. ``lm_head.weight``) are
    dropped first; tensors that merely overlap are cloned, since safetensors
    refuses shared memory.
    """
    patterns = _tied_patterns(model)
    groups: dict[tuple, list[str]] = collections.defaultdict(list)
    for name, tensor in state_dict.items():
        key = (tensor.device, tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        groups[key].append(name)
    out = dict(state_dict)
    storages: dict[tuple, int] = collections.Counter()
    for key, names in groups.items():
        ordered = sorted(names, key=lambda n: (any(re.search(p, n) for p in patterns), n))
        for alias in ordered[1:]:
            del out[alias]
        tensor = state_dict[ordered[0]]
        storages[(tensor.device, tensor.untyped_storage().data_ptr())] += 1
    for name, tensor in out.items():
        if storages[(tensor.device, tensor.untyped_storage().data_ptr())] > 1:
            out[name] = tensor.clone()
    return out


def checkpoint_state_dict(model) -> dict[str, torch.Tensor]:
    """The state dict ``save_pretrained`` would write for ``model`` (not yet on CPU)."""
    state_dict = dict(model.state_dict())
    keys_to_ignore = getattr(model, "_keys_to_ignore_on_save", None) or []
    for key in keys_to_ignore:
        state_dict.pop(key, None)
    if _hf_remove_tied is not None:
        state_dict = _hf_remove_tied(state_dict, model)
    else:
        state_dict = drop_tied_aliases(state_dict, model)
    if _hf_revert is not None:
        state_dict = _hf_revert(model, state_dict)
    return state_dict


def resolve_model_class(config, model_class=None):
    """Concrete ``PreTrainedModel`` subclass to build for ``config``.

    ``model_class`` may be a concrete class, an ``AutoModel*`` class (resolved
    through its mapping) or None (the first of ``config.architectures`` that
    ``transformers`` exports). Raises ``ValueError`` when nothing fits.
    """
    import transformers

    if model_class is None:
        for name in getattr(config, "architectures", None) or []:
            candidate = getattr(transformers, name, None)
            if candidate is not None:
                return candidate
        raise ValueError(
            f"config.architectures={getattr(config, 'architectures', None)!r} names no class "
            "exported by transformers; pass model_class="
        )
    mapping = getattr(model_class, "_model_mapping", None)
    if mapping is not None:  # an AutoModel* class
        try:
            return mapping[type(config)]
        except KeyError:
            raise ValueError(
                f"{model_class.__name__} has no model for config class {type(config).__name__}"
            ) from None
    return model_class
