"""Models wrapped by PEFT adapters (LoRA and its kin) are refused, with the reason and what to do instead.

Why refuse rather than prune something:

* the base weights of an adapted layer are frozen: they get no gradient, so the
  gradient saliencies (taylor, platon, movement) have nothing to score, and the
  optimizer never steps them, so the mask would never be re-applied after an
  update nor the pruned weights given a chance to recover;
* the adapter matrices (``lora_A`` / ``lora_B``) sit inside the numbered blocks
  and would be picked up as default targets, but zeroing half of a rank-8
  factor prunes nothing of the deployed model: after merging, ``W + B @ A`` is
  dense again.

What works instead: merge the adapters (``model = model.merge_and_unload()``)
and prune while fine-tuning the full model, or prune (and fine-tune) first and
add adapters to the pruned model afterwards.

Detection goes by PEFT's conventions, by name only (this module never imports
peft): an adapter layer keeps the layer it wraps in ``base_layer`` and its
adapter weights in modules named ``lora_A``, ``lora_B``, ``lora_embedding_A``,
... ; the wrapper classes are ``PeftModel*`` / ``LoraModel``. Pure torch.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

__all__ = ["AdapterModelError", "adapter_layers", "refuse_adapter_models"]

#: Attributes (sub-modules) that mark a module as a PEFT adapter layer.
ADAPTER_ATTRIBUTES = ("base_layer", "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
#: Class names of PEFT's model wrappers (checked on the model and its ``base_model`` chain).
WRAPPER_CLASS_PREFIXES = ("PeftModel", "PeftMixedModel", "LoraModel")


class AdapterModelError(ValueError):
    """The model carries PEFT adapters; pruning it is refused (see the module docstring)."""


def adapter_layers(model: nn.Module) -> list[str]:
    """Names of the modules that are PEFT adapter layers (hold a ``base_layer`` or ``lora_*`` sub-module)."""
    found = []
    for name, module in model.named_modules():
        if any(isinstance(getattr(module, attr, None), nn.Module) for attr in ADAPTER_ATTRIBUTES):
            found.append(name or "(the model itself)")
    return found


def _wrapper_class(model: nn.Module) -> Optional[str]:
    seen = 0
    while isinstance(model, nn.Module) and seen < 4:
        if type(model).__name__.startswith(WRAPPER_CLASS_PREFIXES):
            return type(model).__name__
        model = getattr(model, "base_model", None)
        seen += 1
    return None


def refuse_adapter_models(model: nn.Module) -> None:
    """Raise `AdapterModelError` if ``model`` is wrapped by PEFT or holds adapter layers; otherwise do nothing."""
    if not isinstance(model, nn.Module):
        return  # find_targets names the type error
    wrapper = _wrapper_class(model)
    layers = adapter_layers(model)
    if wrapper is None and not layers:
        return
    shown = ", ".join(layers[:3]) + (", ..." if len(layers) > 3 else "")
    what = f"a {wrapper}" if wrapper else "a model"
    where = f" with {len(layers)} adapter layers ({shown})" if layers else ""
    raise AdapterModelError(
        f"cannot prune {what}{where}: it carries PEFT adapters (LoRA). Its base weights are frozen, so they get no "
        "gradient to score them and the optimizer never updates them, and pruning the low-rank adapter matrices "
        "removes nothing once they are merged (W + B @ A is dense again). Instead either merge the adapters first "
        "(`model = model.merge_and_unload()`) and prune while fine-tuning the full model, or prune before adding "
        "adapters (fine-tune with pruning, then attach LoRA to the pruned model)."
    )
