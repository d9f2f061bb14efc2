"""Structured pruning over the architecture table: every family x every structured kind (train, masks zero,
slim, save, vanilla reload, logits equal), refusals by message, the user's own unit description."""

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from prune_callbacks import Pruner, PruningConfig  # noqa: E402
from prune_callbacks.methods.structured import StructuredUnitsError, mask_model, unit_map  # noqa: E402
from prune_callbacks.export import slim, slim_pruned
from prune_callbacks.core.families import FAMILIES  # noqa: E402
from support_matrix import (  # noqa: E402
    CASES, COLUMNS, RELOAD_ATOL, batch, build, check, logits,
)
from prune_callbacks.methods.structured.units import block_layout  # noqa: E402

CELLS = [(case, column) for case in CASES for column in COLUMNS]


@pytest.mark.parametrize("case,column", CELLS, ids=[f"{c.name}-{k}" for c, k in CELLS])
def test_architecture_cell(case, column, tmp_path):
    result = check(case, column, tmp_path)
    if column in case.refuse:
        assert result.get("refused") and case.refuse[column] in result["refused"], result
        assert "ffn_neurons" in result["refused"] and "blocks" in result["refused"]  # says what to use instead
        return
    assert not result.get("refused"), result
    assert result["ok"], result
    if column in ("ffn_neurons", "attention_heads", "blocks"):
        assert result["masks_zero"] and result["reload_vs_slim"] <= RELOAD_ATOL
        assert result["params"][1] < result["params"][0] and result["config"]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_case_is_recognised_as_its_family(case):
    assert block_layout(build(case)).family.name == case.family


def test_every_family_has_a_case():
    assert {f.name for f in FAMILIES} == {c.family for c in CASES}


def test_t5_removing_the_first_block_moves_the_position_bias_and_reloads(tmp_path):
    case = next(c for c in CASES if c.name == "T5")
    model = build(case).eval()
    inputs, _ = batch(case, 0)
    n = len(unit_map(model, "blocks"))
    keep = {"blocks": [i not in (0, 3) for i in range(n)]}  # block 0 of the encoder and of the decoder
    masked = copy.deepcopy(model)
    mask_model(masked, keep)
    summary = slim(model, keep)
    assert summary["config"]["num_layers"] == [3, 2] and summary["config"]["num_decoder_layers"] == [3, 2]
    assert model.encoder.block[0].layer[0].SelfAttention.has_relative_attention_bias
    assert torch.allclose(logits(masked, inputs), logits(model, inputs), atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path)
    assert (logits(reloaded, inputs) - logits(model, inputs)).abs().max() <= RELOAD_ATOL


def test_phi3_fused_projections_span_both_halves_and_three_thirds():
    model = build(next(c for c in CASES if c.name == "Phi-3"))
    ffn = unit_map(model, "ffn_neurons")[0]
    gate_up = next(s for s in ffn.spans if s.module.endswith("gate_up_proj"))
    assert [(s.offset, s.size) for s in gate_up.segments] == [(0, 1), (64, 1)]
    heads = unit_map(model, "attention_heads")[0]
    qkv = next(s for s in heads.spans if s.module.endswith("qkv_proj"))
    assert [(s.offset, s.size) for s in qkv.segments] == [(0, 16), (32, 8), (48, 8)]  # 4 heads, 2 KV, head 8
    assert qkv.unit_index(torch.tensor([1])).tolist() == [*range(16, 32), *range(40, 48), *range(56, 64)]


def test_olmo2_head_norms_span_the_heads_and_qwen3_norms_do_not():
    olmo = unit_map(build(next(c for c in CASES if c.name == "OLMo-2")), "attention_heads")[0]
    qwen = unit_map(build(next(c for c in CASES if c.name == "Qwen3")), "attention_heads")[0]
    assert {s.module.rsplit(".", 1)[1] for s in olmo.spans if "norm" in s.module} == {"q_norm", "k_norm"}
    assert not [s for s in qwen.spans if "norm" in s.module]


# ---------------------------------------------------------------- the user's own model
class Attention(nn.Module):
    def __init__(self, hidden, heads, head_dim):
        super().__init__()
        self.head_dim = head_dim
        self.q, self.k, self.v = (nn.Linear(hidden, heads * head_dim) for _ in range(3))
        self.o = nn.Linear(heads * head_dim, hidden)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(-1, -2) / self.head_dim ** 0.5, -1)
        return self.o((att @ v).transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, hidden, heads, head_dim, ffn):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.attn = Attention(hidden, heads, head_dim)
        self.ff = nn.ModuleDict({"up": nn.Linear(hidden, ffn), "down": nn.Linear(ffn, hidden)})

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.ff["down"](torch.relu(self.ff["up"](self.norm2(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab=50, hidden=32, heads=4, head_dim=8, ffn=64, layers=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.trunk = nn.ModuleList([Block(hidden, heads, head_dim, ffn) for _ in range(layers)])
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.trunk:
            x = block(x)
        return self.head(x)


UNITS = {"blocks": ["trunk"], "ffn_in": ["ff.up"], "ffn_out": "ff.down", "q": "attn.q", "k": "attn.k",
         "v": "attn.v", "o": "attn.o", "num_heads": 4, "head_dim": 8}


def _train_custom(model, kinds, units=UNITS, steps=3):
    torch.manual_seed(0)
    sparsity = {"ffn_neurons": 0.5, "attention_heads": 0.5, "blocks": 1 / 3}
    configs = [PruningConfig(granularity=k, final_sparsity=sparsity[k], start_step=1, end_step=1, update_every=1,
                             units=units) for k in kinds]
    pruner = Pruner(model, configs, total_steps=steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pruner.attach(optimizer)
    for step in range(steps):
        ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(step))
        nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    return pruner


def test_custom_description_slims_in_place_and_its_state_dict_loads_into_the_small_model(tmp_path):
    torch.manual_seed(0)
    model = TinyLM()
    pruner = _train_custom(model, ["ffn_neurons", "attention_heads", "blocks"])
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(9))
    model.eval()
    with torch.no_grad():
        masked = model(ids)
    summary = slim_pruned(model, pruner)
    assert summary["config"] == {} and summary["params_after"] < summary["params_before"]
    with torch.no_grad():
        assert torch.allclose(model(ids), masked, atol=1e-5)
    torch.save(model.state_dict(), tmp_path / "slim.pt")
    small = TinyLM(heads=2, ffn=32, layers=2)
    small.load_state_dict(torch.load(tmp_path / "slim.pt"))
    small.eval()
    with torch.no_grad():
        assert (small(ids) - masked).abs().max() <= 1e-5


@pytest.mark.parametrize("change,message", [
    ({"blocks": ["stack"]}, "units.blocks pattern 'stack' matches no nn.ModuleList"),
    ({"ffn_in": ["ff.upp"]}, "units.ffn_in pattern 'ff.upp' matches nothing in block 'trunk.0'"),
    ({"o": "attn.out"}, "units.o pattern 'attn.out' matches nothing"),
    ({"ffn_out": "attn.o"}, "shapes disagree in block 'trunk.0': ffn_in 'ff.up' has 64 output features but ffn_out "
                            "'attn.o' has 32 input features"),
])
def test_custom_description_errors_name_the_pattern_or_the_shapes(change, message):
    with pytest.raises(StructuredUnitsError, match=message.replace("(", r"\(").replace(".", r"\.")):
        _train_custom(TinyLM(), ["ffn_neurons"], units={**UNITS, **change})


@pytest.mark.parametrize("units,message", [
    ({**UNITS, "qkv": "attn.qkv"}, "either qkv or q/k/v"),
    ({**UNITS, "ffn_in": ["("]}, "not a valid regular expression"),
    ({**UNITS, "config_fields": {"width": "d"}}, "config_fields has unknown keys"),
    ({**UNITS, "extra": 1}, "extra"),
])
def test_custom_description_is_validated_by_the_config(units, message):
    with pytest.raises(ValueError, match=message):
        PruningConfig(granularity="ffn_neurons", units=units)


def test_units_do_not_apply_to_unstructured():
    with pytest.raises(ValueError, match="units=.*does not apply to granularity='unstructured'"):
        PruningConfig(units=UNITS)


def test_the_published_matrix_claims_what_the_table_says():
    """docs/support-matrix.md is generated from CASES (regenerate it after changing the table)."""
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "support-matrix.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[3:-1]]
            for line in text.splitlines() if line.startswith("| ") and not line.startswith("| Architecture")}
    assert set(rows) == {c.name for c in CASES}
    for case in CASES:
        claimed = dict(zip(COLUMNS, rows[case.name]))
        assert {k for k, v in claimed.items() if v == "refused"} == set(case.refuse), case.name
        assert all(v == "yes" for k, v in claimed.items() if k not in case.refuse), case.name


def test_custom_description_rewrites_the_config_fields_it_names():
    from types import SimpleNamespace

    model = TinyLM()
    model.config = SimpleNamespace(d_ff=64, n_heads=4, head_size=8, n_layers=3)
    units = {k: v for k, v in UNITS.items() if k not in ("num_heads", "head_dim")}
    units["config_fields"] = {"ffn": "d_ff", "heads": "n_heads", "head_dim": "head_size", "layers": "n_layers"}
    pruner = _train_custom(model, ["ffn_neurons", "attention_heads", "blocks"], units=units)
    summary = slim_pruned(model, pruner)
    assert summary["config"] == {"d_ff": [64, 32], "n_heads": [4, 2], "n_layers": [3, 2]}
    assert vars(model.config) == {"d_ff": 32, "n_heads": 2, "head_size": 8, "n_layers": 2}


@pytest.mark.parametrize("name,kwargs,keep_blocks,message", [
    ("GPT-2", {"scale_attn_by_inverse_layer_idx": True}, [True, False, True],
     "cannot remove blocks of a gpt2 model with scale_attn_by_inverse_layer_idx=True: its attention scale depends"),
    ("T5", {}, [False, False, False, True, True, True], "removes every block of encoder.block; keep at least one"),
])
def test_block_removal_refusals_name_the_reason(name, kwargs, keep_blocks, message):
    case = next(c for c in CASES if c.name == name)
    model = getattr(transformers, case.model)(getattr(transformers, case.config)(**{**case.kwargs, **kwargs}))
    shapes = [p.shape for p in model.parameters()]
    with pytest.raises(StructuredUnitsError, match=message):
        slim(model, {"blocks": keep_blocks})
    assert [p.shape for p in model.parameters()] == shapes
