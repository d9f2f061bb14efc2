"""Merging removed FFN neurons into kept ones (prune_callbacks.methods.structured.merging): refit, hooks, setting."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from prune_callbacks import Pruner, PruningConfig  # noqa: E402
from prune_callbacks.methods.structured import unit_map, zero_units  # noqa: E402
from prune_callbacks.export import slim_pruned
from prune_callbacks.methods.structured.merging import (  # noqa: E402
    MergeConfig, UnitMerger, fold_choice, least_squares_fold)
from prune_callbacks.methods.structured.units import block_layout  # noqa: E402


def bert():
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=24, max_position_embeddings=64)
    return transformers.BertModel(cfg), transformers.AutoModel


def llama():
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=24, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg), transformers.AutoModelForCausalLM


def gpt2():  # Conv1D: weights stored [in, out]
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_inner=24, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg), transformers.AutoModelForCausalLM


ARCHS = {"bert": bert, "llama": llama, "gpt2": gpt2}


def _out(model, ids):
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


class _Every:
    """A schedule whose every step is an update step (the merger arms at once)."""

    @staticmethod
    def is_update_step(step):
        return True


# ------------------------------------------------------------------ the math
@pytest.mark.parametrize("bias", [False, True])
def test_fold_of_near_copies_recovers_the_output(bias):
    g = torch.Generator().manual_seed(0)
    n, k, r, out = 2000, 12, 4, 7
    h_kept = torch.randn(n, k, generator=g) + 0.5
    mix = torch.randn(k, r, generator=g)
    h_removed = h_kept @ mix + 1e-4 * torch.randn(n, r, generator=g) + (0.3 if bias else 0.0)
    h = torch.cat([h_kept, h_removed], 1)
    w = torch.randn(out, k + r, generator=g)
    kept, removed = torch.arange(k), torch.arange(k, k + r)
    delta, shift, recovered = least_squares_fold(w[:, removed], h.T @ h, h.sum(0), n, removed, kept, bias=bias,
                                                 damping=1e-8)
    target = h @ w.T  # the layer's output with every neuron
    merged = h_kept @ (w[:, kept] + delta.float()).T + (shift.float() if bias else 0.0)
    dropped = h_kept @ w[:, kept].T
    dropped_err = (dropped - target).pow(2).mean()
    merged_err = (merged - target).pow(2).mean()
    assert dropped_err > 0.1
    assert merged_err < 1e-6 * dropped_err
    assert recovered == pytest.approx(1.0, abs=1e-5)
    assert (shift is None) == (not bias)


def test_a_constant_neuron_moves_into_the_bias():
    """FLAP's compensation: a removed neuron whose activation is constant is exactly a bias."""
    g = torch.Generator().manual_seed(1)
    h = torch.cat([torch.randn(500, 6, generator=g), torch.full((500, 1), 2.0)], 1)
    w = torch.randn(5, 7, generator=g)
    delta, shift, _ = least_squares_fold(w[:, 6:], h.T @ h, h.sum(0), 500, torch.tensor([6]), torch.arange(6),
                                         bias=True, damping=1e-9)
    assert torch.allclose(shift.float(), 2.0 * w[:, 6], atol=1e-4)
    assert delta.abs().max() < 1e-4


def test_fold_beats_dropping_on_random_activations():
    """Not planted: the refit never does worse than dropping on its own calibration data (damped LS, delta=0 is
    feasible), and does strictly better on correlated features."""
    g = torch.Generator().manual_seed(2)
    h = torch.relu(torch.randn(800, 16, generator=g) @ torch.randn(16, 16, generator=g))
    w = torch.randn(8, 16, generator=g)
    kept, removed = torch.arange(10), torch.arange(10, 16)
    delta, shift, recovered = least_squares_fold(w[:, removed], h.T @ h, h.sum(0), 800, removed, kept, bias=True,
                                                 damping=0.01)
    target = h @ w.T
    merged_err = (h[:, kept] @ (w[:, kept] + delta.float()).T + shift.float() - target).pow(2).mean()
    dropped_err = (h[:, kept] @ w[:, kept].T - target).pow(2).mean()
    assert merged_err < 0.9 * dropped_err
    assert recovered == pytest.approx(1 - float(merged_err / dropped_err), abs=1e-3)  # the reported figure


@pytest.mark.parametrize("bias", [False, True])
def test_fold_choice_removes_the_feature_whose_fold_errs_least(bias):
    """One feature: the greedy surgeon's choice is the exhaustive argmin of the fold's residual."""
    torch.manual_seed(0)
    mix = torch.randn(10, 10) * torch.linspace(0.1, 2, 10)
    h = torch.randn(300, 10) @ mix + torch.randn(10)  # correlated features with a mean
    w = torch.randn(6, 10)
    gram, total = h.T @ h, h.sum(0)
    residual = {}
    for j in range(10):
        kept = torch.tensor([i for i in range(10) if i != j])
        _, _, recovered = least_squares_fold(w[:, [j]], gram, total, 300, torch.tensor([j]), kept, bias=bias,
                                             damping=1e-9)
        energy = float((w[:, [j]] @ (h[:, [j]].T @ h[:, [j]]) / 300 * w[:, [j]]).sum())
        residual[j] = (1 - recovered) * energy
    picked = fold_choice(w, gram, total, 300, torch.arange(10), 1, bias=bias, damping=1e-9)
    assert picked.tolist() == [min(residual, key=residual.get)]
    assert sorted(residual.values())[0] < 0.9 * sorted(residual.values())[1]  # a clear winner: not a tie


@pytest.mark.parametrize("bias", [False, True])
def test_fold_choice_among_some_features_is_the_choice_on_their_statistics_alone(bias):
    """Candidates a subset of the features (a later update of a gradual schedule): the positions chosen are those the
    same choice makes on the candidates' own statistics."""
    torch.manual_seed(0)
    h = torch.randn(300, 10) @ torch.randn(10, 10) + torch.randn(10)
    w = torch.randn(6, 10)
    some = torch.tensor([0, 2, 3, 5, 7, 8, 9])
    sub = h[:, some]
    picked = fold_choice(w[:, some], h.T @ h, h.sum(0), 300, some, 3, bias=bias, damping=1e-3)
    alone = fold_choice(w[:, some], sub.T @ sub, sub.sum(0), 300, torch.arange(len(some)), 3, bias=bias, damping=1e-3)
    assert picked.tolist() == alone.tolist() and len(picked) == 3


def test_fold_choice_takes_one_of_each_pair_of_copies():
    """Features 6-9 copy 0-3: removing a copy costs nothing while its twin stays, so four removals take one of each
    pair, never both (greedy: a twin's cost rises once its copy is gone)."""
    torch.manual_seed(0)
    h = torch.randn(400, 10)
    h[:, 6:] = h[:, :4]
    w = torch.randn(5, 10)
    picked = fold_choice(w, h.T @ h, h.sum(0), 400, torch.arange(10), 4, bias=False, damping=1e-9).tolist()
    assert len(picked) == 4 and all((i in picked) != (i + 6 in picked) for i in range(4))


# ------------------------------------------------------------------ in a model, from the unit description
def _plant_copies(model, removed_of):
    """Make neuron i of every block an exact copy of neuron removed_of[i] on its input side (the rows / columns of
    every FFN input projection and their biases), leaving its output column its own."""
    layout = block_layout(model)
    groups = unit_map(model, "ffn_neurons")
    with torch.no_grad():
        for group in groups:
            _, out = layout.ffn_modules(group.block)
            for span in group.spans:
                if span.module == out:
                    continue
                dst = span.unit_index(torch.tensor(list(removed_of)))
                src = span.unit_index(torch.tensor(list(removed_of.values())))
                span.param.data.index_copy_(span.dim, dst, span.param.data.index_select(span.dim, src))
    return groups


@pytest.mark.parametrize("arch", list(ARCHS))
def test_merged_copies_leave_the_model_unchanged_dropped_ones_do_not(arch):
    torch.manual_seed(0)
    model, _ = ARCHS[arch]()
    removed_of = {20: 3, 21: 3, 22: 7, 23: 11}  # removed neuron -> the kept neuron it copies
    groups = _plant_copies(model, removed_of)
    ids = torch.randint(0, 100, (4, 16))
    dense = _out(model, ids)
    pruned = torch.zeros(24, dtype=torch.bool)
    pruned[list(removed_of)] = True

    dropped_model = ARCHS[arch]()[0]
    dropped_model.load_state_dict(model.state_dict())
    for group in unit_map(dropped_model, "ffn_neurons"):
        zero_units(group, pruned)
    dropped_err = (_out(dropped_model, ids) - dense).abs().max()

    merger = UnitMerger(model, groups, MergeConfig(damping=1e-7))
    merger.watch(1, _Every)
    assert merger.armed
    _out(model, ids)  # calibration pass (the hooks collect in any mode)
    merger.fold([torch.zeros(24, dtype=torch.bool)] * len(groups), [pruned] * len(groups))
    assert all(b.count == 4 * 16 for b in merger.blocks)  # kept for the window's next update
    merger.release()
    assert not merger.armed and all(b.gram is None for b in merger.blocks)  # dropped with the window
    for group in groups:
        zero_units(group, pruned)
    merged_err = (_out(model, ids) - dense).abs().max()
    assert dropped_err > 1e-2
    assert merged_err < 1e-3 * dropped_err
    assert merger.report()["merge"]["neurons"] == 4 * len(groups)


def _run(arch, merge, steps=6, lr=0.0, start=4):
    torch.manual_seed(0)
    model, auto = ARCHS[arch]()
    config = PruningConfig(granularity="ffn_neurons", final_sparsity=0.5, schedule="oneshot", start_step=start,
                           **({"merge": {"calibration_steps": 2}} if merge else {}))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    pruner = Pruner(model, config, total_steps=steps).attach(optimizer)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 100, (4, 16), generator=g) for _ in range(steps)]
    armed, outputs = [], {}
    for step, ids in enumerate(batches, 1):
        model.train()
        out = model(input_ids=ids)
        hidden = out.logits if hasattr(out, "logits") else out.last_hidden_state
        hidden.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        merger = pruner.groups[0].merger
        armed.append(merger is not None and merger.armed)
        if step == start - 1:
            outputs["before"] = _out(model, batches[start - 1])
        if step == start:
            outputs["after"] = _out(model, batches[start - 1])
    return model, auto, pruner, armed, outputs, batches


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_select_fold_removes_copies_and_keeps_the_output(arch):
    """Four neurons per block copy kept ones: with merge.select='fold' the update removes one of each pair (whatever
    the saliency prefers) and the folded model's output is unchanged; the saliency's own choice is not."""
    outputs = {}
    for select in ("fold", "saliency"):
        torch.manual_seed(0)
        model, _ = ARCHS[arch]()
        _plant_copies(model, {20: 3, 21: 5, 22: 7, 23: 11})
        ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
        dense = _out(model, ids)
        config = PruningConfig(granularity="ffn_neurons", final_sparsity=4 / 24, schedule="oneshot", start_step=2,
                               saliency="magnitude", merge={"select": select, "damping": 1e-7})
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        pruner = Pruner(model, config, total_steps=3).attach(optimizer)
        for _ in range(2):
            _out(model, ids)
            optimizer.step()
        outputs[select] = (_out(model, ids) - dense).abs().max()
        for mask in pruner.groups[0].masks:
            assert mask.sum() == 4
            if select == "fold":
                assert all(bool(mask[a]) != bool(mask[b]) for a, b in ((20, 3), (21, 5), (22, 7), (23, 11)))
    assert outputs["fold"] <= 1e-4 < outputs["saliency"]


def test_statistics_accumulate_over_the_updates_of_one_window():
    """Updates every 2 steps with calibration_steps 4: one window from step 1 to the last update; each fold uses
    every token since it opened (a fold does not change its projection's inputs), and the window closes after."""
    torch.manual_seed(0)
    model, _ = ARCHS["llama"]()
    config = PruningConfig(granularity="ffn_neurons", final_sparsity=0.5, schedule="linear", start_step=4,
                           end_step=8, update_every=2, merge={"calibration_steps": 4})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    pruner = Pruner(model, config, total_steps=10).attach(optimizer)
    armed = []
    for ids in torch.randint(0, 100, (10, 4, 16), generator=torch.Generator().manual_seed(0)):
        model(input_ids=ids).logits.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        armed.append(pruner.groups[0].merger.armed)
    report = pruner.report()["groups"][0]["merge"]
    # updates at steps 4 (sparsity 0: nothing to fold), 6 and 8; 64 tokens a step, collected from step 1
    assert report["updates"] == 2 and report["tokens"] == [6 * 64, 8 * 64]
    assert armed == [True] * 7 + [False] * 3  # open for steps 1-8 (armed after step 7 for step 8's forward)
    assert all(b.gram is None for b in pruner.groups[0].merger.blocks)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pruner_oneshot_merge_reduces_output_error_keeps_masks_and_slims(arch, tmp_path):
    """lr=0: the weights change only by pruning, so the output change at the update is the pruning's own error."""
    model, auto, pruner, armed, outputs, batches = _run(arch, merge=True)
    _, _, plain, _, plain_outputs, _ = _run(arch, merge=False)
    # hooks exist only for the calibration_steps=2 steps before the update at step 4 (forwards of steps 3, 4)
    assert armed == [False, True, True, False, False, False]
    report = pruner.report()["groups"][0]["merge"]
    assert report["updates"] == 1 and report["neurons"] == 12 * len(pruner.groups[0].granularity.groups)
    assert torch.equal(pruner.groups[0].masks[0], plain.groups[0].masks[0])  # same units chosen either way
    merged_err = (outputs["after"] - outputs["before"]).pow(2).mean()
    dropped_err = (plain_outputs["after"] - plain_outputs["before"]).pow(2).mean()
    assert merged_err < dropped_err
    for group, pruned in zip(pruner.groups[0].granularity.groups, pruner.groups[0].masks):
        for span in group.spans:  # every spanned slice of a removed neuron is still exactly zero
            assert span.unit_view(span.param.detach(), group.n_units)[pruned].abs().max() == 0
    ids = batches[0]
    masked = _out(model, ids)
    slim_pruned(model, pruner)
    assert (_out(model, ids) - masked).abs().max() <= 1e-5
    model.save_pretrained(tmp_path)
    assert (_out(auto.from_pretrained(tmp_path), ids) - masked).abs().max() <= 1e-5


# ------------------------------------------------------------------ the setting
@pytest.mark.parametrize("granularity", ["unstructured", "2:4", "attention_heads"])
def test_merge_refused_where_it_does_not_apply(granularity):
    extra = {} if granularity == "2:4" else {"final_sparsity": 0.5}
    with pytest.raises(ValueError, match=rf"merge=.*does not apply to granularity='{granularity}' "
                                         r"\(allowed with: ffn_neurons, blocks\)"):
        PruningConfig(granularity=granularity, merge={}, **extra)


@pytest.mark.parametrize("merge,message", [
    ({"damping": 0.0}, "damping=0.0 is invalid"),
    ({"damping": float("inf")}, "damping=inf is invalid"),
    ({"calibration_steps": 0}, "calibration_steps=0 is invalid"),
    ({"steps": 3}, "steps"),
])
def test_merge_values_validated(merge, message):
    with pytest.raises(ValueError, match=message):
        PruningConfig(granularity="ffn_neurons", final_sparsity=0.5, merge=merge)


def test_merge_true_takes_the_defaults():
    config = PruningConfig(granularity="ffn_neurons", final_sparsity=0.5, merge=True)
    assert config.merge == MergeConfig()


def test_update_without_statistics_drops_with_a_warning(caplog):
    torch.manual_seed(0)
    model, _ = ARCHS["llama"]()
    groups = unit_map(model, "ffn_neurons")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merger = UnitMerger(model, groups, MergeConfig())
    pruned = torch.zeros(24, dtype=torch.bool)
    pruned[:4] = True
    with caplog.at_level("WARNING", logger="prune_callbacks.methods.structured.merging"):
        merger.fold([torch.zeros(24, dtype=torch.bool)] * len(groups), [pruned] * len(groups))
    assert "no calibration statistics" in caplog.text
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert merger.report()["merge"]["updates"] == 0


def test_a_fold_from_fewer_tokens_than_inputs_warns_and_reports_its_tokens(caplog):
    torch.manual_seed(0)
    model, _ = ARCHS["llama"]()
    groups = unit_map(model, "ffn_neurons")
    merger = UnitMerger(model, groups, MergeConfig())
    merger.watch(1, _Every)
    _out(model, torch.randint(0, 100, (1, 8)))  # 8 tokens for 20 kept neurons + 1
    pruned = torch.zeros(24, dtype=torch.bool)
    pruned[:4] = True
    with caplog.at_level("WARNING", logger="prune_callbacks.methods.structured.merging"):
        merger.fold([torch.zeros(24, dtype=torch.bool)] * len(groups), [pruned] * len(groups))
    assert f"{len(groups)} block(s) were refit from fewer calibration tokens than inputs" in caplog.text
    assert "8 tokens for 21 inputs" in caplog.text
    assert merger.report()["merge"]["tokens"] == [8]
