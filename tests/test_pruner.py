"""Engine invariants on tiny pure-torch models over real AdamW training."""

import copy

import pytest
import torch

from helpers import TinyLM, lm_loss, random_batches
from prune_callbacks import Pruner, PruningConfig
from prune_callbacks.core.registry import SALIENCIES

CFG = dict(final_sparsity=0.8, start_step=4, end_step=40, update_every=4)
# every registered saliency that scores single weights (a per-unit one is built with a structured granularity only)
METHODS = sorted(n for n in SALIENCIES.names() if not SALIENCIES.get(n).per_unit)


def train(model, pruner, batches, lr=1e-2, weight_decay=0.1, attach=True, opt=None):
    opt = opt or torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    if attach:
        pruner.attach(opt)
    for ids in batches:
        lm_loss(model, ids).backward()
        if not attach:
            pruner.before_optimizer_step()
        opt.step()
        if not attach:
            pruner.after_optimizer_step(opt)
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("saliency", METHODS)
@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_pruned_weights_stay_exactly_zero_under_adamw(saliency, scope):
    torch.manual_seed(0)
    model = TinyLM()
    pruner = Pruner(model, PruningConfig(**CFG, saliency=saliency, scope=scope))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    pruner.attach(opt)
    for i, ids in enumerate(random_batches(200)):
        lm_loss(model, ids).backward()
        opt.step()
        opt.zero_grad()
        for param, pruned in zip(pruner.params, pruner.pruned):
            # exactly zero, and +0.0 (sign bit clear)
            assert torch.equal(param[pruned], torch.zeros_like(param[pruned]))
            assert not torch.signbit(param[pruned]).any()
    report = pruner.report()
    assert report["step"] == 200
    if scope == "global":
        assert report["pruned_params"] == round(0.8 * report["prunable_params"])
    else:
        assert [row["pruned"] for row in report["per_target"].values()] == [round(0.8 * p.numel()) for p in pruner.params]
    assert report["global_sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert pruner.mask_updates == 10  # steps 4, 8, ..., 40


def test_sparsity_follows_schedule_and_never_decreases():
    torch.manual_seed(0)
    model = TinyLM()
    pruner = Pruner(model, PruningConfig(**CFG))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruner.attach(opt)
    seen = []
    for ids in random_batches(50):
        lm_loss(model, ids).backward()
        opt.step()
        opt.zero_grad()
        seen.append(pruner.report()["global_sparsity"])
    assert all(b >= a for a, b in zip(seen, seen[1:]))
    total = pruner.report()["prunable_params"]
    # after step 20: cubic target 0.8 - 0.8 * (1 - 16/36)^3
    assert seen[19] == round((0.8 - 0.8 * (1 - 16 / 36) ** 3) * total) / total
    assert seen[2] == 0.0 and seen[-1] == round(0.8 * total) / total


def test_attach_equals_manual_calls():
    torch.manual_seed(0)
    a = TinyLM()
    b = copy.deepcopy(a)
    pa, pb = Pruner(a, PruningConfig(**CFG)), Pruner(b, PruningConfig(**CFG))
    batches = random_batches(30)
    train(a, pa, batches)
    train(b, pb, batches, attach=False)
    assert all(torch.equal(x, y) for x, y in zip(pa.pruned, pb.pruned))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("saliency", ["taylor", "platon", "movement"])
def test_scaled_gradients_give_identical_masks(saliency):
    torch.manual_seed(0)
    a = TinyLM()
    b = copy.deepcopy(a)
    cfg = PruningConfig(**CFG, saliency=saliency)
    pa, pb = Pruner(a, cfg), Pruner(b, cfg)
    oa = torch.optim.SGD(a.parameters(), lr=0.05)
    ob = torch.optim.SGD(b.parameters(), lr=0.05)
    for i, ids in enumerate(random_batches(40)):
        lm_loss(a, ids).backward()
        pa.before_optimizer_step()
        oa.step()
        pa.after_optimizer_step(oa)
        oa.zero_grad()
        scale = 2.0 ** (8 + i % 5)  # a dynamic loss scale, as a GradScaler would use
        (lm_loss(b, ids) * scale).backward()
        pb.before_optimizer_step(grad_scale=scale)
        for p in b.parameters():
            p.grad.div_(scale)
        ob.step()
        pb.after_optimizer_step(ob)
        ob.zero_grad()
    assert pa.mask_updates == pb.mask_updates > 0
    assert all(torch.equal(x, y) for x, y in zip(pa.pruned, pb.pruned))


def test_grad_scaler_path_sees_unscaled_gradients_and_skips_inf_steps():
    torch.manual_seed(0)
    a = TinyLM()
    b = copy.deepcopy(a)
    cfg = PruningConfig(**CFG)
    pa, pb = Pruner(a, cfg), Pruner(b, cfg)
    oa, ob = torch.optim.SGD(a.parameters(), lr=0.05), torch.optim.SGD(b.parameters(), lr=0.05)
    pa.attach(oa)
    pb.attach(ob)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    for i, ids in enumerate(random_batches(30)):
        lm_loss(a, ids).backward()
        oa.step()
        oa.zero_grad()
        scaler.scale(lm_loss(b, ids)).backward()
        scaler.step(ob)
        scaler.update()
        ob.zero_grad()
    assert pb.step == 30 and pa.mask_updates == pb.mask_updates
    # same masks although the loss scale changed during the run
    assert all(torch.equal(x, y) for x, y in zip(pa.pruned, pb.pruned))
    # an overflowing step is skipped by the scaler: the pruner must not count it
    before = copy.deepcopy(pb.state_dict())
    scaler.scale(lm_loss(b, random_batches(1)[0]) * float("inf")).backward()
    scaler.step(ob)
    scaler.update()
    ob.zero_grad()
    assert pb.step == before["step"]
    assert torch.equal(pb.saliency.buffers["importance"][0], before["saliency"]["importance"][pb.targets[0].name])


def test_nan_gradient_step_changes_nothing():
    torch.manual_seed(0)
    model = TinyLM()
    pruner = Pruner(model, PruningConfig(**CFG))
    opt = train(model, pruner, random_batches(10))
    before = copy.deepcopy(pruner.state_dict())
    lm_loss(model, random_batches(1)[0]).backward()
    pruner.params[0].grad[0, 0] = float("nan")
    pruner.before_optimizer_step()
    pruner.after_optimizer_step(opt)
    after = pruner.state_dict()
    assert after["step"] == before["step"] and after["skipped_steps"] == 1
    for name in before["targets"]:
        assert torch.equal(after["saliency"]["importance"][name], before["saliency"]["importance"][name])
        assert torch.equal(after["masks"][name], before["masks"][name])


@pytest.mark.parametrize("saliency", METHODS)
def test_state_round_trip_is_exact(saliency):
    torch.manual_seed(0)
    straight = TinyLM()
    resumed = copy.deepcopy(straight)
    cfg = PruningConfig(**CFG, saliency=saliency)
    batches = random_batches(50)

    p1 = Pruner(straight, cfg)
    train(straight, p1, batches)

    p2 = Pruner(resumed, cfg)
    opt = train(resumed, p2, batches[:21])
    saved_model = copy.deepcopy(resumed.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    saved_pruner = copy.deepcopy(p2.state_dict())

    fresh = TinyLM()
    fresh.load_state_dict(saved_model)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2, weight_decay=0.1)
    fresh_opt.load_state_dict(saved_opt)
    p3 = Pruner(fresh, cfg)
    p3.load_state_dict(saved_pruner)
    train(fresh, p3, batches[21:], opt=fresh_opt)

    assert p3.step == p1.step == 50
    assert all(torch.equal(x, y) for x, y in zip(p1.pruned, p3.pruned))
    assert all(torch.equal(x, y) for x, y in zip(straight.state_dict().values(), fresh.state_dict().values()))


def test_state_file_round_trip(tmp_path):
    from prune_callbacks.core.state_io import load_state_file, save_state_file

    torch.manual_seed(0)
    model = TinyLM()
    pruner = Pruner(model, PruningConfig(**CFG, saliency="platon"))
    train(model, pruner, random_batches(12))
    state = pruner.state_dict()
    loaded = load_state_file(save_state_file(state, tmp_path / "s.safetensors"))
    assert {k: v for k, v in loaded.items() if k not in ("masks", "saliency")} == {
        k: v for k, v in state.items() if k not in ("masks", "saliency")
    }
    for name in state["targets"]:
        assert torch.equal(loaded["masks"][name], state["masks"][name])
        for buf in ("importance", "uncertainty"):
            assert torch.equal(loaded["saliency"][buf][name], state["saliency"][buf][name])


def test_load_state_for_other_targets_is_rejected():
    p1 = Pruner(TinyLM(layers=3), PruningConfig(**CFG))
    p2 = Pruner(TinyLM(layers=2), PruningConfig(**CFG))
    with pytest.raises(ValueError, match="layers.2.up"):
        p2.load_state_dict(p1.state_dict())


def test_finalize_invariants():
    torch.manual_seed(0)
    model = TinyLM()
    pruner = Pruner(model, PruningConfig(**CFG))
    opt = train(model, pruner, random_batches(60))
    keys = list(model.state_dict())
    params_before = [id(p) for p in model.parameters()]
    ids = random_batches(1, seed=5)[0]
    with torch.no_grad():
        out_before = model(ids)
    pruner.finalize()
    pruner.finalize()  # harmless
    with torch.no_grad():
        assert torch.equal(model(ids), out_before)
    assert list(model.state_dict()) == keys
    assert [id(p) for p in model.parameters()] == params_before
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    for param, pruned in zip(pruner.params, pruner.pruned):
        assert (param[pruned] == 0).all() and not torch.signbit(param[pruned]).any()
    # the optimizer is still valid, and no longer masked: training moves pruned weights again
    lm_loss(model, ids).backward()
    opt.step()
    assert any((p[m] != 0).any() for p, m in zip(pruner.params, pruner.pruned))


def test_l1_is_proximal_and_never_revives_pruned():
    torch.manual_seed(0)
    model = TinyLM()
    pruner = Pruner(model, PruningConfig(**CFG, l1_lambda=0.5, l1_ramp_steps=10))
    zero_at_start = sum(int((p == 0).sum()) for p in pruner.params)
    train(model, pruner, random_batches(60), weight_decay=0.0)
    for param, pruned in zip(pruner.params, pruner.pruned):
        assert (param[pruned] == 0).all()
    # soft-thresholding creates exact zeros beyond the masks
    extra_zeros = sum(int(((p == 0) & ~m).sum()) for p, m in zip(pruner.params, pruner.pruned))
    assert zero_at_start == 0 and extra_zeros > 0


def test_l1_without_pruning():
    torch.manual_seed(0)
    model = TinyLM()
    pruner = Pruner(model, PruningConfig(final_sparsity=0.0, start_step=0, end_step=0, l1_lambda=1.0))
    train(model, pruner, random_batches(30), weight_decay=0.0)
    assert pruner.report()["pruned_params"] == 0
    assert sum(int((p == 0).sum()) for p in pruner.params) > 0


def test_tied_weights_are_excluded_by_default():
    model = TinyLM(tied=True)
    names = [t.param_name for t in Pruner(model, PruningConfig(**CFG)).targets]
    assert "head.weight" not in names and "embed.weight" not in names
    assert names == [f"layers.{i}.{n}.weight" for i in range(3) for n in ("up", "down")]


def test_explicitly_including_a_tied_weight_is_an_error():
    with pytest.raises(ValueError, match=r"head.weight \(tied to embed.weight\)"):
        Pruner(TinyLM(tied=True), PruningConfig(**CFG, include=["head", "layers"]))


def test_untied_head_can_be_included():
    names = [t.name for t in Pruner(TinyLM(tied=False), PruningConfig(**CFG, include=["head"])).targets]
    assert names == ["head"]


def test_pattern_matching_nothing_lists_close_names():
    with pytest.raises(ValueError, match=r"'layers.0.upp' matches no module; close module names: layers\.0\.up"):
        Pruner(TinyLM(), PruningConfig(**CFG, include=["layers.0.upp"]))
    with pytest.raises(ValueError, match="exclude pattern 'mlp'"):
        Pruner(TinyLM(), PruningConfig(**CFG, exclude=["mlp"]))


def test_frozen_target_is_not_a_target_and_a_target_outside_the_optimizer_is_reported_at_attach():
    model = TinyLM()
    model.layers[0].up.weight.requires_grad_(False)
    pruner = Pruner(model, PruningConfig(**CFG))  # frozen: excluded (tests/test_reliability_engine.py)
    assert "layers.0.up" not in [t.name for t in pruner.targets]
    pruner.attach(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]))
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if p.requires_grad and n != "layers.1.up.weight"])
    with pytest.raises(ValueError, match="layers.1.up.weight"):
        pruner.attach(opt)


def test_fractional_steps_need_total_steps():
    with pytest.raises(ValueError, match=r"start_step=0\.1.*total_steps"):
        Pruner(TinyLM(), PruningConfig(final_sparsity=0.5))
    pruner = Pruner(TinyLM(), PruningConfig(final_sparsity=0.5), total_steps=200)
    assert (pruner.steps.start_step, pruner.steps.end_step) == (20, 140)


def test_ddp_style_wrapper_names_are_unwrapped():
    class Wrapper(torch.nn.Module):  # torch.compile-like: the real model under _orig_mod
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    names = [t.name for t in Pruner(Wrapper(TinyLM()), PruningConfig(**CFG)).targets]
    assert names[0] == "layers.0.up"


def test_loading_a_finalized_state_finalizes():
    torch.manual_seed(0)
    model = TinyLM()
    pruner = Pruner(model, PruningConfig(**CFG))
    train(model, pruner, random_batches(45))
    pruner.finalize()
    other = Pruner(TinyLM(), PruningConfig(**CFG))
    opt = torch.optim.AdamW(other.model.parameters())
    other.attach(opt)
    other.load_state_dict(pruner.state_dict())
    assert other.finalized and not opt._optimizer_step_pre_hooks
    assert all(torch.equal(a, b) for a, b in zip(other.pruned, pruner.pruned))
