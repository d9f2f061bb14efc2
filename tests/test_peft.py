"""PEFT LoRA-wrapped models are refused at Pruner construction, with the reason and the way out (issue 16)."""

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from helpers import tiny_llama_lm  # noqa: E402

from prune_callbacks import Pruner, PruningConfig  # noqa: E402
from prune_callbacks.core.peft_support import AdapterModelError, adapter_layers, refuse_adapter_models  # noqa: E402
from prune_callbacks.core.targets import find_targets  # noqa: E402

CFG = PruningConfig(final_sparsity=0.5, start_step=0, end_step=4, update_every=1)


def lora_model(**lora):
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)
    kwargs.update(lora)
    return peft.get_peft_model(tiny_llama_lm(), peft.LoraConfig(task_type="CAUSAL_LM", **kwargs))


@pytest.mark.parametrize("unwrap", [False, True], ids=["PeftModel", "inner model with lora layers"])
def test_lora_model_is_refused_with_reason_and_remedy(unwrap):
    model = lora_model()
    if unwrap:
        model = model.base_model.model  # the LlamaForCausalLM whose layers were replaced by lora.Linear
    with pytest.raises(AdapterModelError) as info:
        Pruner(model, CFG)
    msg = str(info.value)
    for part in ("PEFT adapters", "frozen", "no gradient", "merge_and_unload()", "prune before adding adapters",
                 "6 adapter layers", "q_proj"):
        assert part in msg, part
    assert ("PeftModelForCausalLM" in msg) is (not unwrap)


def test_explicit_include_is_refused_too():
    with pytest.raises(AdapterModelError):
        find_targets(lora_model(), include=[r"base_layer"])


def test_adapter_layers_names_exactly_the_adapted_modules():
    names = adapter_layers(lora_model().base_model.model)
    assert len(names) == 6 and all(n.endswith(("q_proj", "v_proj", "up_proj")) for n in names)


def test_merged_model_prunes_like_a_plain_model():
    model = lora_model()
    with torch.no_grad():  # make the adapters non-trivial so merging changes the weights
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    merged = model.merge_and_unload()
    refuse_adapter_models(merged)  # no error
    assert adapter_layers(merged) == []
    plain = [t.name for t in find_targets(tiny_llama_lm())]
    assert [t.name for t in find_targets(merged)] == plain and len(plain) == 14
    with pytest.raises(ValueError, match="requires_grad=False"):  # peft froze the base weights: nothing to score
        Pruner(merged, CFG)
    merged.requires_grad_(True)
    Pruner(merged, CFG)  # constructs


def test_plain_models_are_untouched():
    refuse_adapter_models(tiny_llama_lm())
    refuse_adapter_models(torch.nn.Linear(3, 3))


def test_detection_never_imports_peft():
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys\nfrom prune_callbacks import Pruner, PruningConfig\nfrom helpers import TinyLM\n"
            "Pruner(TinyLM(), PruningConfig(start_step=1, end_step=2))\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('peft', 'trl', 'transformers'))\n"
            "print(bad); sys.exit(1 if bad else 0)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent)
    assert result.returncode == 0, result.stdout + result.stderr
