"""The unit-level saliency ``unit_taylor``: EMA of (sum over a unit of theta * grad)^2, one float per unit."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from prune_callbacks import Pruner, PruningConfig  # noqa: E402
from prune_callbacks.core.config_errors import PruningConfigError  # noqa: E402
from prune_callbacks.export import slim_pruned  # noqa: E402

from test_structured import ARCHS, _logits, _loss, cfg, llama, train  # noqa: E402

BETA = PruningConfig.model_fields["beta"].default  # the library's own default, which these configs keep
pytestmark = pytest.mark.filterwarnings("ignore:granularity='blocks'")  # the short test runs' recovery advice


def one_step(model, config, seed=0):
    """One recorded step: gradients of a real batch folded into a fresh pruner, no optimizer step."""
    pruner = Pruner(model, config, total_steps=10)
    torch.manual_seed(seed)
    _loss(model, torch.randint(0, 100, (4, 12))).backward()
    pruner.before_optimizer_step()
    pruner.after_optimizer_step()
    return pruner


def test_llama_ffn_scores_are_the_ema_of_the_squared_signed_neuron_sum():
    """Written out by hand for a Llama MLP: neuron j spans gate/up rows j and down column j."""
    torch.manual_seed(0)
    model = llama()
    pruner = one_step(model, cfg("ffn_neurons", 0.5, saliency="unit_taylor"))
    (importance,) = pruner.groups[0].saliency.buffers.values()
    for layer, got in zip(model.model.layers, importance):
        mlp = layer.mlp
        products = [((p.weight * p.weight.grad), dim) for p, dim in
                    ((mlp.gate_proj, 1), (mlp.up_proj, 1), (mlp.down_proj, 0))]
        signed = sum(t.sum(dim) for t, dim in products)
        want = (1 - BETA) * signed.double() ** 2
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-12)
        per_weight = sum(t.abs().sum(dim) for t, dim in products)
        assert (signed.abs() < per_weight).any()  # the signed sum cancels where |theta*grad| does not


UNIT_CASES = [("bert", "ffn_neurons"), ("bert", "blocks"), ("llama", "ffn_neurons"), ("llama", "attention_heads"),
              ("llama", "blocks"), ("gpt2", "ffn_neurons")]


@pytest.mark.parametrize("arch,kind", UNIT_CASES, ids=[f"{a}-{k}" for a, k in UNIT_CASES])
def test_scores_equal_the_squared_unit_sums_of_the_products(arch, kind):
    """Every architecture and kind: the buffers are (1 - beta) * (unit sum of theta*grad)^2, with the unit sums
    taken by the granularity's own unit map from the products (biases and norms included)."""
    torch.manual_seed(0)
    model = ARCHS[arch]()
    pruner = one_step(model, cfg(kind, 0.25 if kind == "blocks" else 0.5, saliency="unit_taylor"))
    group = pruner.groups[0]
    prods = [(p.detach() * p.grad).float() for p in group.params]
    sums = group.granularity.unit_scores(prods)
    (importance,) = group.saliency.buffers.values()
    assert [t.shape for t in importance] == [torch.Size([n]) for n in group.granularity.units_per_group]
    for got, s in zip(importance, sums):
        torch.testing.assert_close(got, (1 - BETA) * s * s, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("arch,kind", UNIT_CASES, ids=[f"{a}-{k}" for a, k in UNIT_CASES])
def test_trained_then_slimmed_equals_the_masked_model(arch, kind):
    torch.manual_seed(0)
    model = ARCHS[arch]()
    pruner = train(model, [cfg(kind, 0.25 if kind == "blocks" else 0.5, saliency="unit_taylor")])
    masks = pruner.groups[0].masks
    if kind == "blocks":
        assert sum(int(m.sum()) for m in masks) == 1  # one of four blocks
    else:
        assert all(int(m.sum()) == m.numel() // 2 for m in masks)  # uniform per block
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    masked = _logits(model, ids)
    slim_pruned(model, pruner)
    assert (_logits(model, ids) - masked).abs().max() <= 1e-5


def test_state_dict_keys_are_the_unit_groups_and_resume_is_exact():
    torch.manual_seed(0)
    model = llama()
    config = cfg("ffn_neurons", 0.5, saliency="unit_taylor")
    pruner = train(model, [config], steps=5)
    state = pruner.state_dict()
    assert sorted(state["saliency"]["importance"]) == sorted(pruner.groups[0].granularity.mask_names)
    resumed = Pruner(copy.deepcopy(model), [config], total_steps=10)
    resumed.load_state_dict(state)
    for a, b in zip(pruner.saliency.scores(pruner.params), resumed.saliency.scores(resumed.params)):
        assert torch.equal(a, b)
    for a, b in zip(pruner.groups[0].masks, resumed.groups[0].masks):
        assert torch.equal(a, b)


@pytest.mark.parametrize("granularity", ["unstructured", "2:4", "2:4-srste"])
def test_refused_where_there_are_no_units(granularity):
    with pytest.raises(PruningConfigError) as err:
        PruningConfig(granularity=granularity, saliency="unit_taylor")
    message = str(err.value)
    assert "saliency='unit_taylor'" in message and f"granularity={granularity!r}" in message
    assert "allowed with: ffn_neurons, attention_heads, blocks" in message


def test_beta_applies_and_uncertainty_beta_is_refused():
    assert PruningConfig(granularity="ffn_neurons", saliency="unit_taylor", beta=0.5).beta == 0.5
    with pytest.raises(PruningConfigError, match="uncertainty_beta=0.5 does not apply to saliency='unit_taylor'"):
        PruningConfig(granularity="ffn_neurons", saliency="unit_taylor", uncertainty_beta=0.5)
