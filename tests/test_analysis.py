"""Redundancy analysis: spectra, saliency mass, duplicate heads / identity blocks, CLI, invariants, errors."""


import pytest
import torch
from torch import nn

from prune_callbacks.analysis import AnalysisError, analyze, spectrum_stats
from prune_callbacks.analysis.saliency_mass import mass_curve, removable_fraction


@pytest.mark.parametrize("m,n,rank", [(40, 30, 5), (64, 64, 1), (20, 50, 20)])
def test_spectra_of_known_rank(m, n, rank):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(m, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, n, generator=g, dtype=torch.float64)
    s = spectrum_stats(w)
    assert s["rank_99"] <= rank and s["rank_90"] <= s["rank_95"] <= s["rank_99"]
    assert s["effective_rank"] == pytest.approx(rank, rel=0.5) and s["effective_rank"] <= rank + 1e-3
    assert s["break_even_rank"] == pytest.approx(m * n / (m + n))
    assert 1.0 - 1e-9 <= s["stable_rank"] <= rank + 1e-3


def test_spectra_identity_is_full_rank():
    s = spectrum_stats(torch.eye(10))
    assert s["effective_rank"] == pytest.approx(10) and s["stable_rank"] == pytest.approx(10)
    assert (s["rank_90"], s["rank_95"], s["rank_99"]) == (9, 10, 10)


def test_mass_curve_by_hand():
    scores = torch.tensor([4.0, 1.0, 3.0, 2.0])  # sorted 1,2,3,4, total 10
    curve = mass_curve(scores, (0.25, 0.5, 0.75))
    assert curve == {0.25: pytest.approx(0.1), 0.5: pytest.approx(0.3), 0.75: pytest.approx(0.6)}
    assert removable_fraction(scores, 0.1) == 0.25 and removable_fraction(scores, 0.05) == 0.0


class _Out:
    def __init__(self, loss, logits):
        self.loss, self.logits = loss, logits


class TinyStack(nn.Module):
    """Two numbered linear layers; loss = sum of outputs (gradients by hand: dL/dW1 = W2^T 1 x^T ...)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(3, 2, bias=False), nn.Linear(2, 2, bias=False)])

    def forward(self, x, labels=None):
        h = self.layers[1](self.layers[0](x))
        return _Out(h.sum(), h)


def test_saliency_mass_matches_hand_computation():
    torch.manual_seed(0)
    model = TinyStack()
    x = torch.randn(4, 3)
    w1, w2 = model.layers[0].weight.detach().clone(), model.layers[1].weight.detach().clone()
    # dL/dW2 = 1 (h1 summed over rows)^T, dL/dW1 = (W2^T 1) (x summed)^T
    h1 = x @ w1.T
    g2 = torch.ones(2, 1) @ h1.sum(0, keepdim=True)
    g1 = (w2.T @ torch.ones(2, 1)) @ x.sum(0, keepdim=True)
    a = analyze(model, [{"x": x}], progress=False, skip_blocks=False)
    for name, w, g in (("layers.0", w1, g1), ("layers.1", w2, g2)):
        expected = mass_curve((w * g).abs())
        got = a["saliency_mass"]["per_layer"][name]
        assert got == pytest.approx(expected)


def _tiny_bert(layers=2, heads=4, hidden=16):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=32, max_position_embeddings=32, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def _batches(n=2, rows=4, length=8):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(1, 50, (rows, length), generator=g),
             "attention_mask": torch.ones(rows, length, dtype=torch.long),
             "labels": torch.randint(0, 2, (rows,), generator=g)} for _ in range(n)]


def test_planted_duplicate_heads_and_identity_block_are_found():
    model = _tiny_bert()
    d = 4
    with torch.no_grad():
        att = model.bert.encoder.layer[0].attention
        for lin in (att.self.query, att.self.key, att.self.value):
            lin.weight[d:2 * d] = lin.weight[:d]
            lin.bias[d:2 * d] = lin.bias[:d]
        att.output.dense.weight[:, d:2 * d] = att.output.dense.weight[:, :d]
        model.bert.encoder.layer[0].output.dense.weight.mul_(100.0)  # block 0 clearly changes its input
        # block 1 made (nearly) an identity: its residual branches write ~nothing
        blk = model.bert.encoder.layer[1]
        blk.attention.output.dense.weight.mul_(1e-4)
        blk.attention.output.dense.bias.zero_()
        blk.output.dense.weight.mul_(1e-4)
        blk.output.dense.bias.zero_()
        for ln in (blk.attention.output.LayerNorm, blk.output.LayerNorm):
            ln.weight.fill_(1.0)
            ln.bias.zero_()
    a = analyze(model, _batches(), _batches(1), progress=False)
    pairs = {(p["a"], p["b"]) for p in a["duplicate_heads"]}
    assert ("bert.encoder.layer.0.head0", "bert.encoder.layer.0.head1") in pairs
    assert len(pairs) == 1
    influence = [b["influence"] for b in a["blocks"]]
    assert influence[1] < 1e-3 and influence[0] > 100 * influence[1]


def test_weights_bitwise_unchanged_and_grads_restored():
    model = _tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    analyze(model, _batches(), _batches(1), progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


def test_bad_inputs_have_clear_errors():
    model = _tiny_bert()
    with pytest.raises(AnalysisError, match="0 batches"):
        analyze(model, [], progress=False)
    with pytest.raises(AnalysisError, match="no calibration"):
        analyze(model, None, progress=False)
    empty = {k: v[:0] for k, v in _batches(1)[0].items()}
    with pytest.raises(AnalysisError, match="zero rows"):
        analyze(model, [empty], progress=False)
    with pytest.raises(AnalysisError, match="nothing to analyse"):
        analyze(nn.Sequential(nn.ReLU()), _batches(1), progress=False)


def test_bottom_overlap_by_hand():
    from prune_callbacks.analysis.saliency_mass import bottom_overlap

    a, b = torch.tensor([1.0, 2, 3, 4]), torch.tensor([1.0, 3, 2, 4])
    assert bottom_overlap(a, a, 0.5) == 1.0
    assert bottom_overlap(a, b, 0.5) == pytest.approx(1 / 3)  # {0,1} vs {0,2}


def test_report_names_no_block_when_the_baseline_is_at_chance():
    from prune_callbacks.analysis.report import markdown

    model = _tiny_bert()
    batches = _batches(2, rows=8)
    a = analyze(model, batches, batches, progress=False)
    a["baseline"], a["chance"] = 0.5, 0.5
    text = markdown(a)
    assert "within noise of the majority-class share" in text and "candidates for removal" not in text
    a["chance"] = 0.0
    for b in a["blocks"]:
        b["metric_skipped"] = 0.5
    assert "candidates for removal" in markdown(a)
