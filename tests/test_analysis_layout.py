"""Analysis reads the one block parser (structured.units); the mean-pooled baseline probe; block skipping."""

import json

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from prune_callbacks.analysis.architecture import map_model  # noqa: E402
from prune_callbacks.analysis.blocks import skipped  # noqa: E402
from prune_callbacks.analysis.probe import MeanPooled, fit_head, trained_pooling  # noqa: E402
from prune_callbacks.methods.structured.masking import is_skipped, skip_block  # noqa: E402
from prune_callbacks.methods.structured.units import StructuredUnitsError, block_layout, unit_map  # noqa: E402


def bert():
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=32, max_position_embeddings=32, num_labels=2,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).eval()


def llama():
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=24, num_hidden_layers=3, num_attention_heads=6,
                                   num_key_value_heads=2, head_dim=4, intermediate_size=32, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg)


def gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=4,
                                                                n_positions=32))


# arch -> (q/k/v module names relative to a block, output projection, heads, kv heads, head_dim)
EXPECTED = {
    "bert": (bert, ["attention.self.query", "attention.self.key", "attention.self.value"], "attention.output.dense",
             (4, 4, 4)),
    "llama": (llama, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "self_attn.o_proj", (6, 2, 4)),
    "gpt2": (gpt2, ["attn.c_attn"], "attn.c_proj", (4, 4, 4)),
}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_analysis_map_is_the_structured_layout(arch):
    build, attn_in, attn_out, geometry = EXPECTED[arch]
    model = build()
    mm = map_model(model)
    layout = block_layout(model)
    assert [b.name for b in mm.blocks] == layout.blocks
    assert (mm.num_heads, mm.num_kv_heads, mm.head_dim) == geometry
    for b, group in zip(mm.blocks, unit_map(model, "ffn_neurons")):
        assert b.attn_in == [f"{b.name}.{n}" for n in attn_in] and b.attn_out == f"{b.name}.{attn_out}"
        # the FFN projections analysis scores are exactly the modules an ffn_neurons unit spans
        assert {*b.ffn_in, b.ffn_out} == {s.module for s in group.spans}


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.small = nn.ModuleList([nn.Linear(2, 2)])
        self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])


def test_unknown_blocks_get_block_figures_but_no_units():
    model = Stack()
    with pytest.raises(StructuredUnitsError, match="no transformer blocks"):
        block_layout(model)
    layout = block_layout(model, known_only=False)
    assert layout.arch is None and layout.blocks == ["layers.0", "layers.1"]
    mm = map_model(model)
    assert [b.name for b in mm.blocks] == ["layers.0", "layers.1"]
    assert all(b.attn_out is None and b.ffn_out is None for b in mm.blocks)
    assert map_model(nn.Sequential(nn.Linear(2, 2))).blocks == []


def _st_folder(path, mean=True):
    (path / "1_Pooling").mkdir(parents=True)
    (path / "modules.json").write_text(json.dumps([{"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
                                                   {"idx": 1, "path": "1_Pooling",
                                                    "type": "sentence_transformers.models.Pooling"}]))
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": not mean,
                                                                "pooling_mode_mean_tokens": mean}))


@pytest.mark.parametrize("layout,expected", [("mean", "mean"), ("cls", "model"), ("none", "model"), ("broken", "model")])
def test_trained_pooling_reads_the_sentence_transformers_config(tmp_path, layout, expected):
    model = bert()
    folder = tmp_path / "ckpt"
    if layout in ("mean", "cls"):
        _st_folder(folder, mean=layout == "mean")
    else:
        folder.mkdir()
        if layout == "broken":
            (folder / "modules.json").write_text("{not json")
    model.config._name_or_path = str(folder)
    pooling, why = trained_pooling(model)
    assert pooling == expected and why


def test_mean_pooled_probe_is_the_masked_mean_and_shares_modules():
    model = bert()
    wrapped = MeanPooled(model)
    assert {n for n, _ in wrapped.named_modules() if n} <= {n for n, _ in model.named_modules() if n}
    ids = torch.randint(1, 50, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    labels = torch.tensor([0, 1, 1])
    out = wrapped(input_ids=ids, attention_mask=mask, labels=labels)
    with torch.no_grad():
        hidden = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        rows = [hidden[i, : int(mask[i].sum())].mean(0) for i in range(3)]
        expected = model.classifier(torch.stack(rows))
    assert torch.allclose(out.logits, expected, atol=1e-5)
    assert float(out.loss) == pytest.approx(float(nn.functional.cross_entropy(expected, labels)), rel=1e-5)
    # padded positions do not count: other ids there give the same logits
    ids2 = ids.clone()
    ids2[mask == 0] = 7
    assert torch.allclose(wrapped(input_ids=ids2, attention_mask=mask).logits, out.logits, atol=1e-5)


def test_fit_head_on_mean_pooled_features_changes_only_the_head():
    model = bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 50, (16, 6), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": (ids[:, 0] > 25).long()}
    assert fit_head(MeanPooled(model), [batch])
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"classifier.weight", "classifier.bias"}


def test_skipped_restores_and_leaves_an_owners_skip_alone():
    model = bert()
    ids = torch.randint(1, 50, (2, 5), generator=torch.Generator().manual_seed(3))
    block = model.bert.encoder.layer[0]
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        with skipped(block):
            assert is_skipped(block)
            skip_logits = model(input_ids=ids).logits
        assert not is_skipped(block) and torch.equal(model(input_ids=ids).logits, dense)
        assert not torch.allclose(skip_logits, dense)
        skip_block(block)
        with skipped(block):
            pass
        assert is_skipped(block)  # the owner's hook survives
