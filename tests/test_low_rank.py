"""granularity='low_rank': exact factors, the budget, Fisher weighting, save/load, resume, overlap, bf16, settings."""

import copy

import pytest
import torch
from torch import nn

from helpers import TinyLM, lm_loss, random_batches, tiny_bert_classifier
from prune_callbacks import Pruner
from prune_callbacks.core.config import PruningConfig, PruningConfigError
from prune_callbacks.export.dispatch import export_pruned
from prune_callbacks.methods.granularity.low_rank import kept_params, max_rank
from prune_callbacks.export.low_rank import LowRankCheckpointError, LowRankLinear, densify, load_low_rank, save_low_rank
from prune_callbacks.core.state_io import load_state_file, save_state_file

CFG = dict(granularity="low_rank", final_sparsity=0.5, start_step=2, end_step=12, update_every=2)


def _train(model, pruner, batches, opt=None):
    opt = opt or torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruner.attach(opt)
    for ids in batches:
        loss = lm_loss(model, ids)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def _trained(sparsity=0.5, importance="fisher", steps=16, dtype=torch.float32):
    model = TinyLM(dim=32, hidden=64).to(dtype)
    cfg = {**CFG, "final_sparsity": sparsity, "granularity_settings": {"importance": importance}}
    pruner = Pruner(model, cfg, total_steps=steps)
    _train(model, pruner, random_batches(steps))
    return model, pruner


@pytest.mark.parametrize("importance", ["fisher", "none"])
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_budget_met_and_no_rank_at_or_above_break_even(sparsity, importance):
    model, pruner = _trained(sparsity, importance)
    gran = pruner.groups[0].granularity
    total = sum(t.numel for t in gran.targets)
    removed = sum(t.numel - kept_params(*t.param.shape, r) for t, r in zip(gran.targets, gran.ranks))
    budget = round(sparsity * total)
    assert budget <= removed < budget + max(sum(t.param.shape) for t in gran.targets)  # one rank step at most
    assert pruner.report()["pruned_params"] == removed
    for t, r in zip(gran.targets, gran.ranks):
        assert r == min(t.param.shape) or 1 <= r <= max_rank(*t.param.shape)
        assert r * sum(t.param.shape) < t.numel or r == min(t.param.shape)


def test_ranks_only_shrink_along_the_schedule():
    model = TinyLM(dim=32, hidden=64)
    pruner = Pruner(model, CFG, total_steps=16)
    seen = []
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruner.attach(opt)
    for ids in random_batches(16):
        lm_loss(model, ids).backward()
        opt.step()
        opt.zero_grad()
        seen.append(list(pruner.groups[0].granularity.ranks))
    for before, after in zip(seen, seen[1:]):
        assert all(a <= b for a, b in zip(after, before))
    assert seen[0] != seen[-1]


def test_factorisation_is_exact_and_weight_has_its_rank():
    model, pruner = _trained()
    pruner.finalize()
    gran = pruner.groups[0].granularity
    weights = {t.name: t.param.detach().clone() for t in gran.targets}
    ranks = dict(zip((t.name for t in gran.targets), gran.ranks))
    ids = random_batches(1)[0]
    before = model(ids)
    summary = export_pruned(model, pruner)["factorize_granularities"]
    assert summary["ranks"] == {n: r for n, r in ranks.items() if r < min(weights[n].shape)}
    for name, r in summary["ranks"].items():
        module = model.get_submodule(name)
        assert isinstance(module, LowRankLinear) and module.rank == r
        torch.testing.assert_close(module.up.weight @ module.down.weight, weights[name], rtol=1e-5, atol=1e-6)
        assert int(torch.linalg.matrix_rank(weights[name])) == r
    torch.testing.assert_close(model(ids), before, rtol=1e-4, atol=1e-5)
    n_params = sum(p.numel() for p in model.parameters())
    assert summary["params_after"] == n_params < summary["params_before"]
    assert summary["params_before"] - summary["params_after"] == pruner.report()["pruned_params"]


class Planted(nn.Module):
    """One 16x16 Linear: big singular directions write outputs 0-7, four small ones outputs 8-15;
    the loss reads only outputs 8-15."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(16, 16, bias=False)])
        g = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
        u = torch.eye(16)
        sigma = torch.tensor([10.0, 9, 8, 7, 6, 5, 4, 3] + [0.4, 0.3, 0.2, 0.1] + [0.0] * 4)
        with torch.no_grad():
            self.layers[0].weight.copy_(u @ torch.diag(sigma) @ q.T)

    def forward(self, x):
        return self.layers[0](x)


@pytest.mark.parametrize("importance, keeps_task", [("fisher", True), ("none", False)])
def test_fisher_weighting_keeps_the_small_directions_that_carry_the_task(importance, keeps_task):
    model = Planted()
    original = model.layers[0].weight.detach().clone()
    cfg = dict(granularity="low_rank", final_sparsity=0.5, start_step=100, end_step=200, include=["layers"],
               granularity_settings={"importance": importance})
    pruner = Pruner(model, cfg, total_steps=1000)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    pruner.attach(opt)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        model(torch.randn(8, 16, generator=g))[:, 8:].pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    pruner.update_masks(0.5)  # 16x16 at half its parameters: rank 4 (4 * 32 = 128)
    assert pruner.groups[0].granularity.ranks == [4]
    after = model.layers[0].weight.detach()
    task_error = float((after - original)[8:].norm() / original[8:].norm())
    assert (task_error < 1e-5) if keeps_task else (task_error > 0.99)


def test_save_load_round_trip_is_bitwise_and_densify_gives_a_plain_folder(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = tiny_bert_classifier()
    pruner = Pruner(model, dict(granularity="low_rank", final_sparsity=0.5, granularity_settings={"importance": "none"}),
                    total_steps=10)
    pruner.update_masks(0.5)
    export_pruned(model, pruner)
    info = save_low_rank(model, tmp_path / "lr")
    assert info["file_bytes"] > 0 and info["ranks"]
    loaded = load_low_rank(tmp_path / "lr")
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    model.eval()
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    densify(tmp_path / "lr", tmp_path / "dense")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "dense")
    assert not any(isinstance(m, LowRankLinear) for m in plain.modules())
    torch.testing.assert_close(plain(input_ids=ids).logits, loaded(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("damage, match", [
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "not a readable safetensors"),
    (lambda p: p.write_bytes(b"garbage"), "not a readable safetensors"),
    (lambda p: __import__("safetensors.torch").torch.save_file({"x": torch.zeros(1)}, str(p)), "metadata missing"),
])
def test_damaged_checkpoint_is_a_clear_error(tmp_path, damage, match):
    model = tiny_bert_classifier()
    pruner = Pruner(model, dict(granularity="low_rank", final_sparsity=0.3, granularity_settings={"importance": "none"}),
                    total_steps=10)
    pruner.update_masks(0.3)
    export_pruned(model, pruner)
    save_low_rank(model, tmp_path)
    damage(tmp_path / "model.low_rank.safetensors")
    with pytest.raises(LowRankCheckpointError, match=match) as info:
        load_low_rank(tmp_path)
    assert str(info.value).startswith(str(tmp_path / "model.low_rank.safetensors"))


def test_resume_is_exact(tmp_path):
    steps, cut = 16, 7  # cut between two mask updates: the cached bases decide the projection
    batches = random_batches(steps)
    torch.manual_seed(0)
    straight = TinyLM(dim=32, hidden=64)
    start = copy.deepcopy(straight.state_dict())
    _train(straight, Pruner(straight, CFG, total_steps=steps), batches)

    first = TinyLM(dim=32, hidden=64)
    first.load_state_dict(start)
    pruner = Pruner(first, CFG, total_steps=steps)
    opt = _train(first, pruner, batches[:cut])
    save_state_file(pruner.state_dict(), tmp_path / "state.safetensors")
    weights, opt_state = copy.deepcopy(first.state_dict()), copy.deepcopy(opt.state_dict())

    second = TinyLM(dim=32, hidden=64)
    second.load_state_dict(weights)
    resumed = Pruner(second, CFG, total_steps=steps)
    resumed.load_state_dict(load_state_file(tmp_path / "state.safetensors"))
    opt2 = torch.optim.AdamW(second.parameters(), lr=1e-2)
    opt2.load_state_dict(opt_state)
    _train(second, resumed, batches[cut:], opt2)
    for (name, a), b in zip(straight.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("other", [{"granularity": "unstructured", "final_sparsity": 0.5},
                                   {"granularity": "2:4"}])
def test_low_rank_and_an_element_wise_granularity_on_one_weight_are_refused(other):
    model = TinyLM(dim=32, hidden=64)
    with pytest.raises(PruningConfigError, match=r"same weights.*subspace.*layers\.0\.up\.weight"):
        Pruner(model, [dict(CFG), {**other, "include": [r"layers\.0\.up"]}], total_steps=16)


def test_low_rank_and_unstructured_on_different_weights_run_together(tmp_path):
    model = TinyLM(dim=32, hidden=64)
    configs = [{**CFG, "include": [r"\.up$"]}, {**CFG, "granularity": "unstructured", "include": [r"\.down$"]}]
    pruner = Pruner(model, configs, total_steps=16)
    _train(model, pruner, random_batches(16))
    state = pruner.state_dict()
    assert any(k.endswith("/basis") for k in state["granularity"])
    again = Pruner(TinyLM(dim=32, hidden=64), configs, total_steps=16)
    save_state_file(state, tmp_path / "s.safetensors")
    again.load_state_dict(load_state_file(tmp_path / "s.safetensors"))
    assert again.groups[0].granularity.ranks == pruner.groups[0].granularity.ranks
    assert again.report()["pruned_params"] == pruner.report()["pruned_params"]


def test_bf16_run_has_no_nan_and_meets_the_budget():
    model, pruner = _trained(dtype=torch.bfloat16)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert pruner.report()["global_sparsity"] >= 0.5
    pruner.finalize()
    assert pruner.report()["global_sparsity"] >= 0.5  # measured: every weight is still its rank-r projection
    summary = export_pruned(model, pruner)["factorize_granularities"]
    assert summary["ranks"]
    assert torch.isfinite(lm_loss(model, random_batches(1)[0]))


def test_measured_counts_see_a_weight_trained_off_its_subspace():
    model, pruner = _trained()
    pruner.finalize()
    assert pruner.report()["global_sparsity"] >= 0.5
    with torch.no_grad():
        model.layers[0].up.weight.add_(torch.randn_like(model.layers[0].up.weight))
    rows = pruner.report()["per_target"]
    assert rows["layers.0.up"]["pruned"] == 0 and rows["layers.1.up"]["pruned"] > 0


@pytest.mark.parametrize("cfg, match", [
    ({"granularity": "unstructured", "granularity_settings": {"importance": "none"}}, "does not apply"),
    ({**CFG, "granularity_settings": {"rank": 3}}, r"granularity_settings\.rank.*unknown.*importance, allocation, projection"),
    ({**CFG, "granularity_settings": {"importance": "hessian"}}, r"granularity_settings\.importance='hessian'.*fisher"),
    ({**CFG, "saliency": "platon"}, r"saliency='platon' does not apply to granularity='low_rank'"),
    ({**CFG, "scope": "per_layer"}, r"scope='per_layer' does not apply to granularity='low_rank'"),
    ({**CFG, "max_layer_sparsity": 0.9}, r"max_layer_sparsity=0.9 does not apply"),
])
def test_settings_that_do_not_apply_are_refused(cfg, match):
    with pytest.raises(PruningConfigError, match=match):
        Pruner(TinyLM(), cfg, total_steps=16)


def test_unreachable_budget_is_refused():
    with pytest.raises(ValueError, match=r"out of reach.*allowed: final_sparsity <= 0\.9531"):
        Pruner(TinyLM(dim=32, hidden=64), {**CFG, "final_sparsity": 0.97}, total_steps=16)


def test_no_gradient_before_the_first_update_is_an_error():
    model = TinyLM()
    pruner = Pruner(model, CFG, total_steps=16)
    with pytest.raises(RuntimeError, match="before any gradient reached it"):
        pruner.update_masks(0.5)


def _spectrum(m, n, rank_95):
    return {"shape": [m, n], "rank_95": rank_95, "break_even_rank": m * n / (m + n)}


@pytest.mark.parametrize("ranks, pays", [
    ([10, 10, 10, 10], True),   # 10 <= (1 - 0.5) * 96: every matrix low-rank enough
    ([10, 90, 90, 90], False),  # a quarter: the rest is only just below break-even
    ([10, 10, 10, 90], True),   # three quarters
])
def test_suggestion_proposes_low_rank_only_where_the_spectra_show_it_pays(ranks, pays):
    from prune_callbacks.analysis.suggest import choose_strategy, low_rank_pays, suggest_pruning

    spectra = {f"layers.{i}.q": _spectrum(192, 192, r) for i, r in enumerate(ranks)}
    rows = [{"name": "unstructured", "kind": "unstructured", "metric": 0.70, "applicable": True, "removed": 0.5,
             "configs": [{"final_sparsity": 0.5, "saliency": "taylor", "scope": "global"}]},
            {"name": "low_rank", "kind": "low_rank", "metric": 0.80, "applicable": True, "removed": 0.5,
             "configs": [{"granularity": "low_rank", "final_sparsity": 0.5,
                          "granularity_settings": {"importance": "none"}}]}]
    a = {"metric": "accuracy", "baseline": 0.82, "eval_rows": 400, "higher_is_better": True, "budget": 0.5,
         "strategies": rows, "spectra": spectra, "goal": "auto"}
    assert low_rank_pays(a)[0] is pays
    chosen, reasons = choose_strategy(a, "auto")
    assert chosen["kind"] == ("low_rank" if pays else "unstructured"), reasons
    assert any(("low_rank considered" if pays else "low_rank left out") in r for r in reasons)
    if pays:
        pruning, why = suggest_pruning(a)
        assert pruning == {"granularity": "low_rank", "final_sparsity": 0.5, "schedule": "oneshot",  # the late cut
                           "start_step": 0.8,
                           "granularity_settings": {"importance": "fisher", "allocation": "relative"}}
        assert any("Fisher-weighted" in r for r in why) and any("cut late" in r for r in why)
        PruningConfig(**pruning)  # a valid config as suggested


def test_probe_measures_low_rank_on_the_budget_and_restores_the_weights():
    from helpers import tiny_llama_lm
    from prune_callbacks.analysis import analyze

    model = tiny_llama_lm(seed=0, num_hidden_layers=2, intermediate_size=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": ids, "labels": ids} for ids in (torch.randint(0, 97, (2, 12), generator=g) for _ in range(2))]
    a = analyze(model, batches, batches, metric="perplexity", budget=0.5, progress=False)
    row = next(r for r in a["strategies"] if r["kind"] == "low_rank")
    assert row["applicable"] and 0.5 <= row["removed"] < 0.52
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_trainer_checkpoint_resume_is_exact(tmp_path):
    """Through the Trainer callbacks: the checkpoint's pruning state holds the bases, resume is bitwise."""
    from test_trainer_checkpoints import StopAt, build

    from prune_callbacks.integrations.trainer import make_callbacks

    cfg = dict(granularity="low_rank", final_sparsity=0.5, start_step=1, end_step=6, update_every=2)
    full = build(tmp_path / "full", make_callbacks(**cfg))
    full.train()
    build(tmp_path / "cut", [*make_callbacks(**cfg), StopAt(4)]).train()
    saved = load_state_file(tmp_path / "cut" / "checkpoint-4" / "pruning_state.safetensors")
    assert any(k.endswith("/basis") for k in saved["granularity"])
    resumed = build(tmp_path / "cut", make_callbacks(**cfg))
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-4"))
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_export_dispatches_on_the_granularity_structured_and_low_rank_in_one_call():
    model = tiny_bert_classifier()
    configs = [{"granularity": "ffn_neurons", "final_sparsity": 0.5,
                "include": [r"intermediate\.dense", r"layer\.\d+\.output\.dense"]},
               {"granularity": "low_rank", "final_sparsity": 0.5, "include": [r"attention\.self"],
                "granularity_settings": {"importance": "none"}}]
    pruner = Pruner(model, configs, total_steps=10)
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
    pruner.before_optimizer_step()
    pruner.update_masks(0.5)
    model.eval()
    masked = model(input_ids=ids).logits
    summary = export_pruned(model, pruner)
    assert set(summary) == {"slim_granularities", "factorize_granularities"}
    assert model.config.intermediate_size == 37 - round(0.5 * 37)  # the structured exporter cut the neurons
    assert set(summary["factorize_granularities"]["ranks"]) == {
        f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "key", "value")}
    assert all(isinstance(model.get_submodule(n), LowRankLinear) for n in summary["factorize_granularities"]["ranks"])
    torch.testing.assert_close(model(input_ids=ids).logits, masked, rtol=1e-4, atol=1e-5)


def test_accelerate_loop_with_accumulation_and_bf16_autocast():
    """Through the Accelerate hook (gradient accumulation, bf16 autocast): ranks shrink on real steps only,
    the budget is met, nothing is NaN, and export factorises."""
    pytest.importorskip("accelerate")
    from test_accelerate_hook import _setup, _train_step

    from helpers import reset_accelerate_state
    from prune_callbacks.integrations.accelerate.hook import AcceleratePruningHook

    reset_accelerate_state()
    try:
        acc, model, opt, sched = _setup(accum=3, mixed_precision="bf16")
        hook = AcceleratePruningHook(dict(CFG, start_step=1, end_step=4, update_every=1), total_steps=6)
        pruner = hook.register(acc, model, opt)
        for ids in random_batches(18):
            _train_step(acc, model, opt, sched, ids)
        report = hook.finalize()
        assert pruner.step == 6 and 0.5 <= report["global_sparsity"] < 0.52
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert export_pruned(acc.unwrap_model(model), pruner)["factorize_granularities"]["ranks"]
    finally:
        reset_accelerate_state()
