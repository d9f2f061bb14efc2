"""slim(): cut structured units out; outputs equal the masked model's; a vanilla reload gives the same model."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from prune_callbacks.methods.structured import StructuredUnitsError, mask_model, unit_map  # noqa: E402
from prune_callbacks.export import slim


def bert():
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    return transformers.BertModel(cfg), transformers.AutoModel


def llama():
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
                                   num_key_value_heads=2, head_dim=12, intermediate_size=64,
                                   max_position_embeddings=64, attention_bias=True)
    return transformers.LlamaForCausalLM(cfg), transformers.AutoModelForCausalLM


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=3, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg), transformers.AutoModelForCausalLM


ARCHS = {"bert": bert, "llama": llama, "gpt2": gpt2}
# (arch, kind): the config fields that must change
CASES = [
    ("bert", "ffn_neurons", {"intermediate_size": 64 - 24}),
    ("bert", "blocks", {"num_hidden_layers": 2}),
    ("bert", "ffn_neurons+blocks", {"intermediate_size": 40, "num_hidden_layers": 2}),
    ("llama", "ffn_neurons", {"intermediate_size": 40}),
    ("llama", "attention_heads", {"num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": 12}),
    ("llama", "blocks", {"num_hidden_layers": 2}),
    ("llama", "ffn_neurons+attention_heads+blocks",
     {"intermediate_size": 40, "num_key_value_heads": 1, "num_hidden_layers": 2}),
    ("gpt2", "ffn_neurons", {"n_inner": 128 - 24}),
    ("gpt2", "blocks", {"n_layer": 2}),
]


def _outputs(model, ids):
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def make_keep(model, kinds, seed=0):
    """Random uniform keep: 24 FFN neurons / 1 KV group removed per block, block 1 removed."""
    g = torch.Generator().manual_seed(seed)
    keep = {}
    for kind in kinds.split("+"):
        if kind == "blocks":
            n = len(unit_map(model, "blocks"))
            keep["blocks"] = [i != 1 for i in range(n)]
            continue
        drop = 24 if kind == "ffn_neurons" else 1
        masks = []
        for group in unit_map(model, kind):
            kept = torch.ones(group.n_units, dtype=torch.bool)
            kept[torch.randperm(group.n_units, generator=g)[:drop]] = False
            masks.append(kept)
        keep[kind] = masks
    return keep


@pytest.mark.parametrize("arch,kinds,fields", CASES, ids=[f"{a}-{k}" for a, k, _ in CASES])
def test_slim_equals_masked_and_reloads(arch, kinds, fields, tmp_path):
    torch.manual_seed(0)
    model, auto = ARCHS[arch]()
    ids = torch.randint(0, 100, (2, 16))
    dense = _outputs(model, ids)
    keep = make_keep(model, kinds)
    mask_model(model, keep)
    masked = _outputs(model, ids)
    assert (masked - dense).abs().max() > 1e-3  # the keep really changes the model
    n_before = sum(p.numel() for p in model.parameters())
    summary = slim(model, keep)
    slimmed = _outputs(model, ids)
    assert (slimmed - masked).abs().max() <= 1e-5
    assert summary["params_after"] == sum(p.numel() for p in model.parameters()) < n_before
    for field, value in fields.items():
        assert getattr(model.config, field) == value, field
    model.save_pretrained(tmp_path)
    reloaded = auto.from_pretrained(tmp_path)
    for field, value in fields.items():
        assert getattr(reloaded.config, field) == value, field
    assert sum(p.numel() for p in reloaded.parameters()) == summary["params_after"]
    assert (_outputs(reloaded, ids) - masked).abs().max() <= 1e-5


def test_removed_blocks_renumber_layer_idx_and_generate_with_cache():
    torch.manual_seed(0)
    model, _ = llama()
    slim(model, {"blocks": [True, False, True]})
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    ids = torch.randint(0, 100, (1, 5))
    model.eval()
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True)
        uncached = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_gqa_groups_keep_their_query_heads():
    model, _ = llama()
    groups = unit_map(model, "attention_heads")
    assert len(groups) == 3 and all(g.n_units == 2 for g in groups)  # 2 KV groups of 3 query heads each
    sizes = {s.module.rsplit(".", 1)[-1] + "." + s.param_name: (s.dim, s.size) for s in groups[0].spans}
    assert sizes["q_proj.weight"] == (0, 3 * 12) and sizes["q_proj.bias"] == (0, 36)
    assert sizes["k_proj.weight"] == (0, 12) and sizes["v_proj.bias"] == (0, 12)
    assert sizes["o_proj.weight"] == (1, 36)
    assert model.model.layers[0].self_attn.num_key_value_groups == 3
    slim(model, {"attention_heads": [torch.tensor([False, True])] * 3})
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (36, 48) and attn.k_proj.weight.shape == (12, 48)
    assert attn.o_proj.weight.shape == (48, 36) and attn.num_key_value_groups == 3


def test_gpt2_conv1d_layout_spans():
    model, _ = gpt2()
    spans = {s.module.rsplit(".", 1)[-1] + "." + s.param_name: s.dim for s in unit_map(model, "ffn_neurons")[0].spans}
    assert spans == {"c_fc.weight": 1, "c_fc.bias": 0, "c_proj.weight": 0}


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_attention_heads_refused_where_config_cannot_describe_them(arch):
    model, _ = ARCHS[arch]()
    with pytest.raises(StructuredUnitsError, match="ffn_neurons.*blocks"):
        unit_map(model, "attention_heads")


def test_non_uniform_keep_refused_and_model_untouched():
    model, _ = bert()
    keep = make_keep(model, "ffn_neurons")
    keep["ffn_neurons"][2] = torch.arange(64) < 37  # block 2 keeps fewer
    shapes = [p.shape for p in model.parameters()]
    with pytest.raises(StructuredUnitsError, match="non-uniform ffn_neurons keep .*block 2: 37"):
        slim(model, keep)
    assert [p.shape for p in model.parameters()] == shapes


def test_non_uniform_width_of_a_removed_block_is_ignored():
    model, _ = bert()
    keep = make_keep(model, "ffn_neurons+blocks")
    keep["ffn_neurons"][1][:] = True  # block 1 is removed, so its width does not matter
    assert slim(model, keep)["kept"] == {"ffn_neurons": 40, "blocks": [0, 2]}


def test_slim_leaves_a_config_shared_with_another_model_alone():
    """transformers models built from one config object share it; slimming one must not reshape the other."""
    model, _ = llama()
    twin = transformers.LlamaForCausalLM(model.config)  # the same config object
    assert twin.config is model.config
    slim(model, make_keep(model, "ffn_neurons+attention_heads+blocks"))
    assert (twin.config.intermediate_size, twin.config.num_key_value_heads, twin.config.num_hidden_layers) == (64, 2, 3)
    assert (model.config.intermediate_size, model.config.num_hidden_layers) == (40, 2)
    assert all(m.config is model.config for m in model.modules() if hasattr(m, "config"))
    ids = torch.randint(0, 100, (1, 8))
    assert _outputs(transformers.LlamaForCausalLM(twin.config), ids).shape == (1, 8, 100)
