"""granularity='low_rank' through the adapters' export option (Trainer ``slim=True``, Accelerate
``finalize(slim=True)``, recipe ``output.slim: true``): the model ends factorised (`LowRankLinear`), computes
what the projected (pre-export) model computed, refuses a plain save, and its `save_low_rank` checkpoint loads
back equal; a recipe without slim saves the dense-shaped rank-r model that plain from_pretrained loads."""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("transformers")

from transformers import TrainerCallback  # noqa: E402

from helpers import tiny_llama_lm  # noqa: E402
from prune_callbacks.integrations.exporting import FACTORISED_PLAIN_SAVE  # noqa: E402
from prune_callbacks.export.low_rank import LowRankLinear, load_low_rank, low_rank_modules, save_low_rank  # noqa: E402

CFG = {"granularity": "low_rank", "final_sparsity": 0.5, "start_step": 1, "end_step": 4, "update_every": 1,
       "granularity_settings": {"importance": "none"}}


def _assert_factorised_and_equal(model, projected, ids, tmp_path, auto=None):
    ranks = low_rank_modules(model)
    assert ranks and all(isinstance(model.get_submodule(n), LowRankLinear) for n in ranks)
    for name in ranks:  # each factorised weight is the projected one (the logits alone barely see q / k)
        torch.testing.assert_close(model.get_submodule(name).dense_weight(), projected.get_submodule(name).weight,
                                   rtol=1e-4, atol=1e-6)
    model.eval()
    with torch.no_grad():
        expected = projected.eval()(input_ids=ids).logits
        got = model(input_ids=ids).logits
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        with pytest.raises(RuntimeError, match="save_low_rank"):  # plain from_pretrained could not rebuild it
            model.save_pretrained(tmp_path / "plain")
        save_low_rank(model, tmp_path / "low_rank")
        reloaded = load_low_rank(tmp_path / "low_rank", model_class=auto)
        torch.testing.assert_close(reloaded(input_ids=ids).logits, got, rtol=0, atol=0)
    assert low_rank_modules(reloaded) == ranks


class _Snapshot(TrainerCallback):
    """Keeps a copy of the model after the last optimizer step (projected weights), before the train-end export."""

    model = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == state.max_steps:
            self.model = copy.deepcopy(model)


def test_trainer_slim_factorises_a_low_rank_run(tmp_path):
    from test_trainer_callbacks import build

    from prune_callbacks.integrations.trainer import make_callbacks

    callbacks = make_callbacks(dict(CFG, end_step=6, update_every=2, include=[r"attention\.self"]), slim=True)
    snapshot = _Snapshot()
    # the default (fused) AdamW, at a learning rate where a weight that left its subspace would show
    trainer = build(tmp_path, [snapshot, *callbacks], learning_rate=1e-3)
    trainer.train()
    assert snapshot.model is not None and not low_rank_modules(snapshot.model)
    ids = torch.randint(8, 101, (2, 12), generator=torch.Generator().manual_seed(0))
    _assert_factorised_and_equal(trainer.model, snapshot.model, ids, tmp_path)
    with pytest.raises(RuntimeError, match="save_low_rank"):  # trainer.save_model goes through save_pretrained
        trainer.save_model(str(tmp_path / "trainer_save"))


def test_accelerate_finalize_slim_factorises_a_low_rank_run(tmp_path):
    pytest.importorskip("accelerate")
    from accelerate import Accelerator

    from helpers import reset_accelerate_state
    from prune_callbacks.integrations.accelerate.hook import AcceleratePruningHook

    reset_accelerate_state()
    try:
        acc = Accelerator(cpu=True)
        model = tiny_llama_lm(seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model, opt = acc.prepare(model, opt)
        hook = AcceleratePruningHook(dict(CFG, include=[r"layers\.\d+\.(self_attn|mlp)\."]), total_steps=6)
        hook.register(acc, model, opt)
        g = torch.Generator().manual_seed(0)
        for _ in range(6):
            ids = torch.randint(0, 97, (4, 10), generator=g)
            acc.backward(model(input_ids=ids, labels=ids).loss)
            opt.step()
            opt.zero_grad()
        inner = acc.unwrap_model(model)
        projected = copy.deepcopy(inner)
        report = hook.finalize(slim=True)
        with pytest.raises(ValueError, match="save_low_rank"):  # the sparse format cannot hold the factors
            hook.finalize(save_sparse_to=tmp_path / "sparse")
    finally:
        reset_accelerate_state()
    low = report["low_rank"]
    assert "slim" not in report and set(low["ranks"]) == set(low_rank_modules(inner))
    assert low["params_after"] < low["params_before"] and low["bytes_after"] < low["bytes_before"]
    assert low["params_before"] == sum(p.numel() for p in projected.parameters())
    assert low["params_after"] == sum(p.numel() for p in inner.parameters())
    assert not (tmp_path / "sparse").exists()
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(1))
    _assert_factorised_and_equal(inner, projected, ids, tmp_path)


def _recipe(tmp_path, name, **output):
    from recipe_fixtures import tiny_recipe, write_recipe

    out = tmp_path / name
    recipe = tiny_recipe(tmp_path, out, output={"dir": str(out), "plot": False, **output})
    recipe["pruning"] = dict(CFG, start_step=1, end_step=3, include=[r"attention\.self"])  # no saliency: low_rank has none
    return write_recipe(tmp_path / f"{name}.yaml", recipe), out


def test_recipe_slim_writes_a_low_rank_checkpoint_equal_to_the_projected_model(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from prune_callbacks.cli import main
    from prune_callbacks.export.low_rank import WEIGHTS_NAME

    projected_recipe, projected_out = _recipe(tmp_path, "projected", save_sparse=False)
    low_recipe, low_out = _recipe(tmp_path, "low", slim=True)
    assert main(["finetune", str(projected_recipe)]) == 0  # slim false: the dense-shaped rank-r weights
    assert main(["finetune", str(low_recipe)]) == 0
    ids = AutoTokenizer.from_pretrained(str(low_out))(["good film bad plot", "fun story"], padding=True,
                                                      return_tensors="pt")["input_ids"]
    projected = AutoModelForSequenceClassification.from_pretrained(str(projected_out)).eval()
    low = load_low_rank(low_out)
    assert not (low_out / "model.safetensors").exists() and (low_out / WEIGHTS_NAME).is_file()
    assert not (low_out / "sparse").exists() and (low_out / "tokenizer.json").is_file()
    with torch.no_grad():
        torch.testing.assert_close(low(input_ids=ids).logits, projected(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    ranks = low_rank_modules(low)
    assert set(ranks) == {f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2)
                          for p in ("query", "key", "value")}

    report = json.loads((low_out / "report.json").read_text())
    summary = report["low_rank"]
    assert "slim" not in report and summary["ranks"] == ranks
    assert summary["params_after"] == summary["saved_params"] == sum(p.numel() for p in low.parameters())
    assert summary["params_after"] < summary["params_before"] and summary["bytes_after"] < summary["bytes_before"]
    assert summary["params_before"] == sum(p.numel() for p in projected.parameters())
    assert report["sizes"]["model_bytes"] == (low_out / WEIGHTS_NAME).stat().st_size
    assert "nothing to compress" in report["sizes"]["sparse_skipped"]
    projected_report = json.loads((projected_out / "report.json").read_text())
    assert report["sparsity"] == projected_report["sparsity"]  # measured on the projected model before the export


def test_recipe_validate_accepts_low_rank_with_and_without_slim(tmp_path):
    from prune_callbacks.recipe import load_recipe

    for name, output in (("plain", {}), ("slim", {"slim": True})):
        recipe, _ = _recipe(tmp_path, name, **output)
        assert load_recipe(recipe).output.slim is bool(output)


def test_recipe_slim_refusal_names_low_rank(tmp_path):
    from recipe_fixtures import tiny_recipe, write_recipe

    from prune_callbacks.recipe import RecipeError, load_recipe

    out = tmp_path / "u"
    recipe = write_recipe(tmp_path / "u.yaml", tiny_recipe(tmp_path, out, pruning={"final_sparsity": 0.5},
                                                           output={"dir": str(out), "slim": True}))
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    assert "low_rank (Linears factorised)" in str(info.value) and FACTORISED_PLAIN_SAVE not in str(info.value)
