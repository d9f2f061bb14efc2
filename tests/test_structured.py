"""Structured granularities with the Pruner: masks on every spanned tensor, uniform units, then slim."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from prune_callbacks import Pruner, PruningConfig  # noqa: E402
from prune_callbacks.methods.structured import StructuredUnitsError  # noqa: E402
from prune_callbacks.export import slim_pruned, structured_keep


def bert():
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, num_labels=2)
    return transformers.BertForSequenceClassification(cfg)


def llama():
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=48, num_hidden_layers=4, num_attention_heads=6,
                                   num_key_value_heads=2, head_dim=12, intermediate_size=64,
                                   max_position_embeddings=64, attention_bias=True)
    return transformers.LlamaForCausalLM(cfg)


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=4, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg)


ARCHS = {"bert": bert, "llama": llama, "gpt2": gpt2}


def _loss(model, ids):
    if "SequenceClassification" in type(model).__name__:
        return model(input_ids=ids, labels=ids[:, 0] % 2).loss
    return model(input_ids=ids, labels=ids).loss


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def train(model, configs, steps=10, seed=0, total_steps=10):
    torch.manual_seed(seed)
    pruner = Pruner(model, configs, total_steps=total_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    pruner.attach(optimizer)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, 100, (4, 12))
        _loss(model, ids).backward()
        optimizer.step()
        optimizer.zero_grad()
    return pruner


def cfg(kind, sparsity, **kw):
    return PruningConfig(granularity=kind, final_sparsity=sparsity, start_step=2, end_step=8, update_every=2, **kw)


CASES = [("bert", ["ffn_neurons"]), ("bert", ["blocks"]), ("bert", ["ffn_neurons", "blocks"]),
         ("llama", ["ffn_neurons"]), ("llama", ["attention_heads"]), ("llama", ["blocks"]),
         ("llama", ["ffn_neurons", "attention_heads", "blocks"]), ("gpt2", ["ffn_neurons"]), ("gpt2", ["blocks"])]
SPARSITY = {"ffn_neurons": 0.5, "attention_heads": 0.5, "blocks": 0.25}


@pytest.mark.parametrize("arch,kinds", CASES, ids=[f"{a}-{'+'.join(k)}" for a, k in CASES])
def test_train_masks_uniform_then_slim_equals_masked(arch, kinds, tmp_path):
    torch.manual_seed(0)
    model = ARCHS[arch]()
    pruner = train(model, [cfg(k, SPARSITY[k]) for k in kinds])
    for group in pruner.groups:
        g = group.granularity
        # masks zero on every spanned tensor (weights and biases) after AdamW steps with weight decay
        for unit_group, pruned in zip(g.groups, g.masks):
            assert pruned.any() or g.kind == "blocks"
            for span in unit_group.spans:
                view = span.unit_view(span.param.detach(), unit_group.n_units)
                assert torch.all(view[pruned] == 0), span.name
                if len(kinds) == 1:  # (with blocks removed too, a removed block's kept neurons are zero)
                    assert torch.all(view[~pruned].abs().sum(1) > 0), span.name  # kept units still live
        report = pruner.report()["groups"][pruner.groups.index(group)]
        if g.kind == "blocks":
            assert report["kept_blocks"] == [i for i in range(4) if not g.masks[i].any()]
            assert len(report["kept_blocks"]) == 3  # 25% of 4 blocks removed
        else:  # uniform: the same count in every block
            n = g.groups[0].n_units
            assert set(report["kept_per_block"].values()) == {n - round(SPARSITY[g.kind] * n)}
    ids = torch.randint(0, 100, (2, 12))
    masked = _logits(model, ids)
    summary = slim_pruned(model, pruner)
    assert pruner.finalized
    assert summary["params_after"] < summary["params_before"]
    assert (_logits(model, ids) - masked).abs().max() <= 1e-5
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    assert (_logits(reloaded, ids) - masked).abs().max() <= 1e-5


def test_blocks_pruned_on_bert_are_skipped_not_just_zeroed():
    """BERT is post-LayerNorm: a zeroed block is not the identity, a skipped one is."""
    torch.manual_seed(0)
    model = bert()
    pruner = train(model, [cfg("blocks", 0.5)])
    kept = structured_keep(pruner)["blocks"]
    assert kept.count(False) == 2
    ids = torch.randint(0, 100, (2, 12))
    reference = copy.deepcopy(model)
    reference.bert.encoder.layer = torch.nn.ModuleList(
        [layer for layer, k in zip(reference.bert.encoder.layer, kept) if k])
    reference.config.num_hidden_layers = 2
    assert (_logits(model, ids) - _logits(reference, ids)).abs().max() <= 1e-6


@pytest.mark.parametrize("saliency", ["taylor", "unit_taylor"])
def test_units_selected_by_saliency_per_block(saliency):
    """Dead neurons (gate and up rows zero: activation and every gradient zero) are the ones pruned, per block."""
    torch.manual_seed(0)
    model = llama()
    dead = torch.arange(0, 64, 4)  # 16 dead neurons per block = 25%
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[dead] = 0.0
            layer.mlp.up_proj.weight[dead] = 0.0
    pruner = train(model, [cfg("ffn_neurons", 0.25, saliency=saliency)])
    for mask in pruner.groups[0].masks:
        assert torch.equal(mask.nonzero().reshape(-1), dead)


def test_state_dict_resumes_exactly():
    torch.manual_seed(0)
    model = llama()
    pruner = train(model, [cfg("ffn_neurons", 0.5)], steps=5)  # mid-schedule (end_step 8 of 10)
    state = pruner.state_dict()
    other = copy.deepcopy(model)
    resumed = Pruner(other, [cfg("ffn_neurons", 0.5)], total_steps=10)
    resumed.load_state_dict(state)
    for a, b in zip(pruner.groups[0].masks, resumed.groups[0].masks):
        assert torch.equal(a, b)
    for a, b in zip(pruner.saliency.scores(pruner.params), resumed.saliency.scores(resumed.params)):
        assert torch.equal(a, b)


def test_bert_attention_heads_refused_with_its_message():
    with pytest.raises(StructuredUnitsError, match="hidden_size / num_attention_heads.*'ffn_neurons'.*'blocks'"):
        Pruner(bert(), cfg("attention_heads", 0.5), total_steps=10)


def test_gpt2_attention_heads_refused():
    with pytest.raises(StructuredUnitsError, match="c_attn.*'ffn_neurons'"):
        Pruner(gpt2(), cfg("attention_heads", 0.5), total_steps=10)


def test_scope_outside_blocks_makes_width_non_uniform_and_slim_refuses():
    torch.manual_seed(0)
    model = bert()
    pruner = train(model, [cfg("ffn_neurons", 0.5, include=[r"layer\.[01]\."])])
    assert len(pruner.groups[0].granularity.groups) == 2
    with pytest.raises(StructuredUnitsError, match="non-uniform"):
        slim_pruned(model, pruner)


def test_slim_pruned_needs_a_structured_group():
    model = bert()
    pruner = Pruner(model, PruningConfig(final_sparsity=0.5, start_step=1, end_step=2), total_steps=4)
    with pytest.raises(StructuredUnitsError, match="structured granularity"):
        slim_pruned(model, pruner)


def test_unstructured_only_fields_refused_for_structured():
    with pytest.raises(ValueError, match="scope='per_layer' does not apply to granularity='ffn_neurons'"):
        PruningConfig(granularity="ffn_neurons", scope="per_layer")


@pytest.mark.parametrize("value", [2, 1.0, 3.5])
def test_blocks_final_sparsity_is_a_fraction_and_a_count_is_refused_with_the_fraction_to_give(value):
    from prune_callbacks.core.config import PruningConfigError

    with pytest.raises(PruningConfigError) as info:
        PruningConfig(granularity="blocks", final_sparsity=value)
    text = str(info.value)
    assert f"final_sparsity={value!r} is invalid for granularity='blocks'" in text
    assert "fraction of blocks removed" in text and "not a count" in text
    with pytest.raises(PruningConfigError, match=r"must be in \[0, 1\)"):  # other granularities: the generic check
        PruningConfig(granularity="ffn_neurons", final_sparsity=value)


@pytest.mark.parametrize("k", [1, 3])
def test_blocks_fraction_k_over_n_removes_k_blocks(k):
    pruner = train(bert(), [cfg("blocks", k / 4)])
    kept = structured_keep(pruner)["blocks"]
    assert len(kept) == 4 and kept.count(False) == k


@pytest.mark.parametrize("granularity, schedule, end, total, warned", [
    ("blocks", "cubic", 0.8, 100, True),  # 20% of the run left after the last block goes (the 3x plan collapsed there)
    ("blocks", "cubic", 0.6, 100, False),
    ("blocks", "cubic", 70, 100, False),  # exactly the advised 30% left
    ("blocks", "cubic", 71, 100, True),
    ("blocks", "oneshot", 0.8, 100, True),  # a one-shot cut ends at its start_step (the default end_step, 0.7, unread)
    ("blocks", "oneshot", 0.33, 100, False),
    ("ffn_neurons", "cubic", 0.95, 100, False),  # width: no advice
])
def test_removing_blocks_late_in_the_run_is_warned_once_and_listed(granularity, schedule, end, total, warned, recwarn):
    sparsity = 0.5
    window = dict(start_step=end) if schedule == "oneshot" else dict(start_step=0.1 if end < 1 else 10, end_step=end)
    config = PruningConfig(granularity=granularity, final_sparsity=sparsity, schedule=schedule, saliency="magnitude",
                           **window)
    pruner = Pruner(bert(), [config], total_steps=total)
    for g in pruner.groups:
        g.resolve(total)  # resolved again (the Trainer's train begin): warned once
    messages = [str(w.message) for w in recwarn.list]
    assert pruner.schedule_advice() == messages
    if warned:
        (text,) = messages
        last = round(end * total) if end < 1 else end
        assert "granularity='blocks'" in text and f"at step {last} of {total}" in text and "by 0.7 of the run" in text
    else:
        assert messages == []


@pytest.mark.parametrize("make", [bert, llama], ids=["bert", "llama"])
def test_a_skipped_block_hands_on_the_very_tensor_it_got(make):
    """What the hidden-state distillation loss relies on to match a cut once (`losses.hidden_loss`): in the
    ``hidden_states`` transformers returns, a removed block's output is the same tensor as its input."""
    from prune_callbacks.methods.structured.masking import skip_block
    from prune_callbacks.methods.structured.units import block_layout

    model = make().eval()
    layout = block_layout(model)
    skip_block(layout.modules[layout.stacks[0][1][1]])  # the second block
    states = model(input_ids=torch.randint(3, 90, (2, 5)), output_hidden_states=True).hidden_states
    assert [states[k + 1] is states[k] for k in range(3)] == [False, True, False]
