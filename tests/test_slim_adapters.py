"""`slim=True` through the Trainer callbacks: the saved model is smaller, reloads with vanilla
from_pretrained and gives the masked model's outputs."""

import pytest
import torch

pytest.importorskip("transformers")

from test_trainer_callbacks import build  # noqa: E402
from transformers import AutoModelForSequenceClassification  # noqa: E402

from prune_callbacks import PruningConfig  # noqa: E402
from prune_callbacks.integrations.trainer import make_callbacks  # noqa: E402


def test_make_callbacks_slim_saves_a_smaller_model_that_reloads(tmp_path):
    callbacks = make_callbacks(PruningConfig(granularity="ffn_neurons", final_sparsity=0.5, start_step=2, end_step=6,
                                             update_every=2), slim=True)
    trainer = build(tmp_path, callbacks)
    dense_params = sum(p.numel() for p in trainer.model.parameters())
    trainer.train()
    model = trainer.model
    assert model.config.intermediate_size == 19  # 37 neurons per block, round(18.5) = 18 removed
    assert all(layer.intermediate.dense.out_features == 19 for layer in model.bert.encoder.layer)
    model.eval()
    ids = torch.randint(8, 101, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    trainer.save_model(str(tmp_path / "slim"))
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "slim")).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-5)
    assert sum(p.numel() for p in reloaded.parameters()) == dense_params - 2 * 18 * (2 * 32 + 1)
