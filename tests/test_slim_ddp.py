"""Structured pruning + slim under 2-process DDP (torchrun, CPU gloo): every rank ends with the same slim model."""

from pathlib import Path

import pytest
import torch

from helpers import rank_results, run_torchrun

pytest.importorskip("transformers")

SCRIPT = Path(__file__).with_name("ddp_slim_script.py")


@pytest.mark.slow
def test_ddp_ranks_end_with_identical_slimmed_weights(tmp_path):
    from transformers import AutoModelForSequenceClassification

    run_torchrun(SCRIPT, tmp_path, timeout=170)
    r0, r1 = rank_results(tmp_path)
    assert r0["distributed"] and r1["distributed"]
    assert r0["config"] == r1["config"] == {"intermediate_size": 19, "num_hidden_layers": 3}
    assert r0["weights"] == r1["weights"] and r0["params"] == r1["params"]
    saved = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "slim"))
    assert sum(p.numel() for p in saved.parameters()) == r0["params"]
    assert len(saved.bert.encoder.layer) == 3
    assert all(layer.intermediate.dense.weight.shape == torch.Size([19, 32]) for layer in saved.bert.encoder.layer)
