"""N:M-srste (SR-STE): exact N:M after finalize, pruned weights can return, decay only on pruned positions,
the forward sees W * keep while the optimizer keeps the dense weights, state, and what is refused.

The paths (plain loop, Trainer, Accelerate, recipe; counts, resume, export, DDP) are rows of tests/test_contract.py."""

import pytest
import torch
from torch import nn

from helpers import TinyLM, lm_loss, random_batches
from prune_callbacks import Pruner, PruningConfig
from prune_callbacks.core.config import PruningConfigError
from prune_callbacks.methods.granularity import NM, NMSRSTE

CFG = dict(start_step=2, end_step=12, update_every=2)


def _targets(model):
    return [m.weight for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith("layers.")]


def _train(model, pruner, steps, lr=1e-2, check=None):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    pruner.attach(opt)
    for step, ids in enumerate(random_batches(steps), start=1):
        lm_loss(model, ids).backward()
        opt.step()
        opt.zero_grad()
        if check:
            check(pruner, step)
    return opt


@pytest.mark.parametrize("pattern", ["2:4", "1:4"])
def test_exact_n_of_m_after_finalize_and_a_plain_model(pattern):
    n, m = map(int, pattern.split(":"))
    torch.manual_seed(0)
    model = TinyLM()
    pruner = Pruner(model, PruningConfig(granularity=f"{pattern}-srste", **CFG))
    g = pruner.groups[0].granularity
    assert isinstance(g, NMSRSTE) and (g.n, g.m) == (n, m) and pruner.groups[0].config.final_sparsity == 1 - n / m

    def between_steps(pruner, step):  # the forward always sees W * keep: exact zeros where the masks say
        for p, mask in zip(g.params, g.masks):
            assert bool((p[mask] == 0).all())

    _train(model, pruner, 16, check=between_steps)
    assert g.shadow is not None and any(bool((s[mask] != 0).any()) for s, mask in zip(g.shadow, g.masks))
    pruner.finalize()
    assert g.shadow is None
    for t, w in zip(g.targets, _targets(model)):
        kept = (w != 0).reshape(-1, m).sum(-1)
        assert bool((kept == n).all())
        assert torch.equal(g.groups_kept(w == 0, t), kept)
    assert pruner.report()["global_sparsity"] == pytest.approx(1 - n / m)
    assert {k for k in model.state_dict()} == {k for k in TinyLM().state_dict()}  # same keys: a plain model


def _planted(pattern="2:4-srste", decay=0.0):
    """One Linear(4 -> 1) in a block; |W| = [1, 2, .1, .2] so magnitude prunes inputs 2 and 3 first."""
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 1, bias=False)))
    with torch.no_grad():
        model[0][0].weight.copy_(torch.tensor([[1.0, 2.0, 0.1, 0.2]]))
    config = PruningConfig(granularity=pattern, saliency="magnitude", initial_sparsity=0.5, start_step=1,
                           end_step=3, update_every=1,
                           **({"granularity_settings": {"decay": decay}} if pattern.endswith("srste") else {}))
    pruner = Pruner(model, config)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    pruner.attach(opt)
    w = model[0][0].weight
    seen = []
    for x in ([0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]):  # step 2 pushes input 2 up
        loss = -10.0 * model(torch.tensor([x])).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        seen.append(w.detach().clone().reshape(-1))
    return pruner, seen


def test_a_pruned_weight_comes_back():
    pruner, seen = _planted()
    assert torch.equal(seen[0], torch.tensor([1.0, 2.0, 0.0, 0.0]))  # step 1: inputs 2, 3 pruned
    # step 2: the gradient at W * keep reached the pruned input 2 (straight through): its dense weight is 10.1,
    # the mask update keeps it and prunes input 0 instead
    assert torch.equal(seen[1], torch.tensor([0.0, 2.0, 0.1, 0.0]) + torch.tensor([0.0, 0.0, 10.0, 0.0]))
    assert pruner.groups[0].granularity.returned == 0  # step 3 changed nothing
    pruner.finalize()
    nm, plain = _planted("2:4")  # plain N:M never revisits: input 2 stays pruned
    assert torch.equal(plain[1], torch.tensor([1.0, 2.0, 0.0, 0.0]))


def test_returned_count_reported_at_the_update_that_revives():
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 1, bias=False)))
    g = Pruner(model, PruningConfig(granularity="2:4-srste", **CFG)).groups[0].granularity
    g.set_masks([torch.tensor([[False, False, True, True]])])
    g.set_masks([torch.tensor([[True, False, False, True]])])
    assert g.returned == 1 and g.report()["returned_at_last_update"] == 1


def test_decay_is_added_to_pruned_gradients_only():
    torch.manual_seed(0)
    model = TinyLM()
    decay = 0.5
    pruner = Pruner(model, PruningConfig(granularity="2:4-srste", granularity_settings={"decay": decay},
                                         start_step=1, end_step=4, update_every=1))
    g = pruner.groups[0].granularity
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batches = random_batches(4)
    for ids in batches[:3]:  # hand-driven loop
        lm_loss(model, ids).backward()
        pruner.before_optimizer_step()
        opt.step()
        pruner.after_optimizer_step()
        opt.zero_grad()
    assert g.shadow is not None
    lm_loss(model, batches[3]).backward()
    before = [p.grad.clone() for p in g.params]
    pruner.before_optimizer_step()
    for p, shadow, mask, b in zip(g.params, g.shadow, g.masks, before):
        assert torch.equal(p, shadow)  # the dense weights are back in the parameters for the optimizer
        assert torch.equal(p.grad[~mask], b[~mask])  # kept weights: the gradient as computed
        torch.testing.assert_close(p.grad[mask], b[mask] + decay * p[mask], rtol=0, atol=1e-7)
        assert bool((p[mask] != 0).any())


def test_state_dict_holds_the_shadow_and_a_state_without_it_is_refused():
    torch.manual_seed(0)
    model = TinyLM()
    pruner = Pruner(model, PruningConfig(granularity="2:4-srste", **CFG))
    g = pruner.groups[0].granularity
    assert g.state_dict() == {}
    _train(model, pruner, 4)
    state = g.state_dict()
    assert sorted(state) == sorted(f"shadow/{n}" for n in g.mask_names)
    for s, t in zip(g.shadow, state.values()):
        assert torch.equal(s, t)
    with pytest.raises(ValueError, match="shadow"):
        g.load_state_dict({k: v for i, (k, v) in enumerate(state.items()) if i})


def test_settings_errors_name_field_value_and_what_is_allowed():
    with pytest.raises(PruningConfigError, match=r"granularity_settings.decay=-1.*greater than or equal to 0"):
        PruningConfig(granularity="2:4-srste", granularity_settings={"decay": -1})
    with pytest.raises(PruningConfigError, match=r"decay=nan.*finite"):
        PruningConfig(granularity="2:4-srste", granularity_settings={"decay": float("nan")})
    with pytest.raises(PruningConfigError, match=r"lambda.*unknown.*allowed keys: decay"):
        PruningConfig(granularity="2:4-srste", granularity_settings={"lambda": 1e-4})
    with pytest.raises(PruningConfigError, match=r"does not apply to granularity='2:4'"):
        PruningConfig(granularity="2:4", granularity_settings={"decay": 1e-4})
    with pytest.raises(PruningConfigError, match="0 < N < M"):
        PruningConfig(granularity="4:4-srste")
    with pytest.raises(PruningConfigError, match=r"l1_lambda=0.1 does not apply to granularity='2:4-srste'"):
        PruningConfig(granularity="2:4-srste", l1_lambda=0.1)
    with pytest.raises(PruningConfigError, match=r"accuracy_guard does not apply to granularity='2:4-srste'"):
        PruningConfig(granularity="2:4-srste", accuracy_guard={"metric": "eval_loss", "max_drop": 0.1})
    assert NMSRSTE.supports_sharding is False and NM.supports_sharding is True  # refused under FSDP2 (test_fsdp2)
