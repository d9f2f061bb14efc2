"""AccelerateDistillationHook: before-pruning snapshot, unchanged loop body, exact save_state / load_state."""

import pytest
import torch

accelerate = pytest.importorskip("accelerate")
pytest.importorskip("transformers")

from accelerate import Accelerator  # noqa: E402
from helpers import reset_accelerate_state, tiny_bert_classifier, toy_classification_rows  # noqa: E402

from prune_callbacks import PruningConfig  # noqa: E402
from prune_callbacks.controllers.distillation import DistillationConfigError  # noqa: E402
from prune_callbacks.integrations.accelerate.hook import AcceleratePruningHook  # noqa: E402
from prune_callbacks.integrations.accelerate.distillation import AccelerateDistillationHook  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    reset_accelerate_state()
    yield
    reset_accelerate_state()


def batches(n=8, size=4):
    rows = toy_classification_rows(n * size)
    out = []
    for i in range(n):
        chunk = rows[i * size:(i + 1) * size]
        out.append({k: torch.tensor([r[k] for r in chunk]) for k in ("input_ids", "attention_mask", "labels")})
    return out


def setup(accumulation=1):
    acc = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    model = tiny_bert_classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = acc.prepare(model, opt)
    pruning = AcceleratePruningHook(PruningConfig(final_sparsity=0.5, start_step=3, end_step=6, update_every=1), total_steps=8)
    pruning.register(acc, model, opt)
    distill = AccelerateDistillationHook(hardness=0.5)
    distill.register(acc, model, opt, pruning=pruning)
    return acc, model, opt, pruning, distill


def loop(acc, model, opt, data):
    model.train()
    for batch in data:
        with acc.accumulate(model):
            acc.backward(model(**batch).loss)
            opt.step()
            opt.zero_grad()


def test_snapshot_before_first_mask_update_and_figures():
    acc, model, opt, pruning, distill = setup(accumulation=2)
    loop(acc, model, opt, batches(16))
    d = distill.distiller
    assert d.teacher_step == 2 and pruning.pruner.step == 8
    assert all(torch.count_nonzero(p) == p.numel() for n, p in d.teacher.named_parameters() if "query.weight" in n)
    figs = distill.figures()
    assert figs["distill/kd_loss"] > 0 and figs["distill/task_loss"] > 0
    distill.detach()
    assert "forward" not in acc.unwrap_model(model).__dict__ or not hasattr(
        acc.unwrap_model(model).__dict__["forward"], "_prune_callbacks_distiller")


def test_save_state_load_state_restores_the_teacher_bitwise(tmp_path):
    acc, model, opt, pruning, distill = setup()
    loop(acc, model, opt, batches(4))
    acc.save_state(str(tmp_path / "state"))
    teacher = {k: v.clone() for k, v in distill.distiller.teacher.state_dict().items()}
    reset_accelerate_state()
    acc2, model2, opt2, pruning2, distill2 = setup()
    assert distill2.distiller.teacher is None
    acc2.load_state(str(tmp_path / "state"))
    got = distill2.distiller.teacher.state_dict()
    assert got.keys() == teacher.keys() and all(torch.equal(got[k], teacher[k]) for k in got)
    assert distill2.distiller.teacher_step == 2


def test_before_pruning_needs_the_pruning_hook():
    acc = Accelerator(cpu=True)
    model, opt = acc.prepare(tiny_bert_classifier(), torch.optim.SGD(tiny_bert_classifier().parameters(), lr=0.1))
    with pytest.raises(DistillationConfigError, match="pruning="):
        AccelerateDistillationHook().register(acc, model, opt)
