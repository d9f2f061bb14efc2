"""Distillation core: config validation, the KD / hidden losses against hand-computed values, the teacher,
and the forward patch (loss mix, no teacher gradients, the student tracks the teacher)."""

import math

import pytest
import torch

pytest.importorskip("transformers")

from helpers import tiny_bert_classifier, tiny_llama_lm  # noqa: E402

from prune_callbacks.controllers.distillation import (  # noqa: E402
    DistillationConfig,
    DistillationConfigError,
    Distiller,
    hidden_loss,
    kd_loss,
    make_distillation_config,
    module_bytes,
    token_mask,
)
from prune_callbacks.controllers.distillation import teacher as teacher_lib  # noqa: E402


# ---------------------------------------------------------------- config
@pytest.mark.parametrize("fields, names", [
    ({"temperature": 0.0}, ["temperature=0.0", "> 0"]),
    ({"temperature": float("inf")}, ["temperature=inf"]),
    ({"hardness": 1.5}, ["hardness=1.5", "[0, 1]"]),
    ({"hardness": -0.1}, ["hardness=-0.1"]),
    ({"hidden_weight": -1.0}, ["hidden_weight=-1.0", ">= 0"]),
    ({"snapshot": "later"}, ["snapshot", "train_begin", "before_pruning", "'later'"]),
    ({"teacher_dtype": "fp8"}, ["teacher_dtype", "bf16", "fp16", "'fp8'"]),
    ({"teacher": 3}, ["teacher=3", '"self"']),
    ({"teacher": "/no/such/teacher"}, ["teacher='/no/such/teacher'", "no such folder"]),
    ({"tempreature": 2.0}, ["unknown key 'tempreature'", "allowed keys", "temperature"]),
])
def test_bad_config_names_field_value_and_allowed(fields, names):
    with pytest.raises(DistillationConfigError) as info:
        make_distillation_config(fields)
    for name in names:
        assert name in str(info.value)


def test_config_defaults_and_overrides():
    cfg = make_distillation_config(None)  # the measured defaults (BENCHMARKS.md, "Distillation")
    assert (cfg.teacher, cfg.snapshot, cfg.temperature, cfg.hardness, cfg.hidden_weight, cfg.teacher_dtype) == (
        "self", "before_pruning", 2.0, 0.5, 0.0, None)
    assert make_distillation_config(cfg, hardness=1.0).hardness == 1.0 and cfg.hardness == 0.5
    with pytest.raises(DistillationConfigError, match="give a DistillationConfig"):
        make_distillation_config("hardness=1")


# ---------------------------------------------------------------- losses
def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def test_kd_loss_matches_hand_computation():
    s, t, T = [1.0, 2.0, 0.0], [2.0, 0.0, 1.0], 2.0
    ps, pt = _softmax([x / T for x in s]), _softmax([x / T for x in t])
    kl_row = sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))
    s2, t2 = [0.5, -1.0, 3.0], [0.0, 0.0, 0.0]
    ps2, pt2 = _softmax([x / T for x in s2]), _softmax([x / T for x in t2])
    kl_row2 = sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt2, ps2))
    expected = T * T * (kl_row + kl_row2) / 2
    got = kd_loss(torch.tensor([s, s2]), torch.tensor([t, t2]), temperature=T)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert kl_row > 0.05  # the example is not trivially zero
    assert kd_loss(torch.tensor([s]), torch.tensor([s]), temperature=T).item() == pytest.approx(0.0, abs=1e-7)


def test_kd_loss_token_mask_and_num_items():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 4, 5, generator=g), torch.randn(2, 4, 5, generator=g)
    labels = torch.tensor([[1, 2, -100, -100], [3, 4, 1, -100]])
    mask = token_mask(s, labels, shift=True)  # position p predicts token p+1
    assert mask.tolist() == [[True, False, False, False], [True, True, False, False]]
    per = [kd_loss(s[b, p][None], t[b, p][None]).item() for b, p in [(0, 0), (1, 0), (1, 1)]]
    assert kd_loss(s, t, mask=mask).item() == pytest.approx(sum(per) / 3, rel=1e-5)
    assert kd_loss(s, t, mask=mask, num_items_in_batch=6).item() == pytest.approx(sum(per) / 6, rel=1e-5)
    assert token_mask(s, labels).sum() == 5  # unshifted: token classification
    assert token_mask(torch.zeros(2, 3), torch.tensor([0, 1])) is None  # classification: every row
    with pytest.raises(ValueError, match="same vocabulary"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_hidden_loss_is_normalised_mse_per_block():
    emb = torch.zeros(1, 2, 2)
    t1, s1 = torch.tensor([[[1.0, 2.0], [2.0, 0.0]]]), torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    t2 = torch.tensor([[[3.0, 0.0], [0.0, 4.0]]])
    s2 = t2.clone()
    expected = ((1 + 4) / (1 + 4 + 4) + 0.0) / 2  # block 1: sum (t-s)^2 / sum t^2; block 2 equal
    assert hidden_loss((emb, s1, s2), (emb, t1, t2)).item() == pytest.approx(expected)
    masked = hidden_loss((emb, s1, s2), (emb, t1, t2), mask=torch.tensor([[True, False]]))
    assert masked.item() == pytest.approx((1 / 5) / 2)
    with pytest.raises(ValueError, match="same number of blocks"):
        hidden_loss((emb, s1), (emb, t1, t2))


def test_hidden_loss_matches_a_run_of_removed_blocks_once_at_the_next_kept_block():
    """A skipped block hands on the same tensor: states 1 and 2 are one object, matched only at index 2."""
    emb = torch.zeros(1, 2, 2)
    t1, t2 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), torch.tensor([[[2.0, 0.0], [0.0, 2.0]]])
    s1 = t2.clone()  # equals the teacher's state after the removed block
    t3 = torch.tensor([[[0.0, 3.0], [3.0, 0.0]]])
    s3 = torch.zeros(1, 2, 2)
    cut = hidden_loss((emb, s1, s1, s3), (emb, t1, t2, t3)).item()
    assert cut == pytest.approx((0.0 + 1.0) / 2)  # index 1 dropped; index 2 exact; index 3 all wrong
    copy = hidden_loss((emb, s1, s1.clone(), s3), (emb, t1, t2, t3)).item()  # equal values, not the same tensor
    assert copy == pytest.approx((1.0 + 0.0 + 1.0) / 3)  # every index counts: index 1 is 2 * t1 against t1
    last = hidden_loss((emb, t1, s1, s1), (emb, t1, t3, t2)).item()  # the final block removed: matched at the end
    assert last == pytest.approx(0.0)


# ---------------------------------------------------------------- teacher
def test_snapshot_is_frozen_separate_and_sized():
    student = tiny_bert_classifier()
    teacher = teacher_lib.snapshot(student, "bf16")
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    assert all(p.dtype == torch.bfloat16 for p in teacher.parameters())
    assert not any(t is teacher for t in student.modules())
    assert {id(p) for p in teacher.parameters()}.isdisjoint(id(p) for p in student.parameters())
    params = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    assert params(teacher) * 2 == params(student)  # int buffers (position ids) are not cast
    assert module_bytes(teacher) < 0.55 * module_bytes(student)
    assert all(p.requires_grad for p in student.parameters())


@pytest.mark.parametrize("make_teacher, field", [
    (lambda: tiny_bert_classifier(num_labels=3), "num_labels"),
    (lambda: tiny_bert_classifier(vocab_size=103), "vocab_size"),
])
def test_incompatible_teacher_is_refused_before_compute(make_teacher, field):
    d = Distiller(DistillationConfig(teacher=make_teacher()))
    with pytest.raises(DistillationConfigError, match=field):
        d.attach(tiny_bert_classifier())
    assert d.model is None


def test_lm_teacher_with_other_vocabulary_is_refused(tmp_path):
    tiny_llama_lm(vocab_size=89).save_pretrained(tmp_path / "teacher")
    d = Distiller(DistillationConfig(teacher=str(tmp_path / "teacher")))
    with pytest.raises(DistillationConfigError, match="vocab_size=89"):
        d.attach(tiny_llama_lm())


def test_teacher_save_restore_is_bitwise(tmp_path):
    student = tiny_llama_lm()  # tied embeddings
    teacher = teacher_lib.snapshot(student)
    teacher_lib.save_teacher(teacher, tmp_path / "t.safetensors", meta={"teacher_step": 3})
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(0.5)  # the student moved on: a re-snapshot would differ
    back = teacher_lib.restore_teacher(student, tmp_path / "t.safetensors")
    a, b = teacher.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(back.model.embed_tokens.weight, student.model.embed_tokens.weight)
    assert teacher_lib.read_meta(tmp_path / "t.safetensors") == {"teacher_step": 3}


# ---------------------------------------------------------------- the forward patch
def _batch(n=8, seq=10, vocab=101, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": (ids[:, 1] % 2)}


@pytest.mark.parametrize("hardness", [1.0, 0.3])
def test_patched_loss_mixes_kd_and_task(hardness):
    student, teacher = tiny_bert_classifier(seed=0), tiny_bert_classifier(seed=1)
    student.eval()  # no dropout: the same forward twice gives the same numbers
    batch = _batch()
    plain = student(**batch)
    d = Distiller(DistillationConfig(teacher=teacher, hardness=hardness, temperature=2.0)).attach(student)
    student.train()
    for m in student.modules():  # training mode for the patch, but no dropout
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    out = student(**batch)
    kd = kd_loss(plain.logits, teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits, temperature=2.0)
    assert out.loss.item() == pytest.approx(hardness * kd.item() + (1 - hardness) * plain.loss.item(), rel=1e-5)
    figs = d.figures()
    assert figs["distill/kd_loss"] == pytest.approx(kd.item(), rel=1e-5)
    assert figs["distill/task_loss"] == pytest.approx(plain.loss.item(), rel=1e-5)
    assert d.figures() == {}  # reset after reading
    student.eval()
    assert student(**batch).loss.item() == pytest.approx(plain.loss.item(), rel=1e-6)  # eval: task loss only
    d.detach()
    assert "forward" not in student.__dict__


def test_teacher_gets_no_gradient_nor_optimizer_state_and_stays_fixed():
    student = tiny_bert_classifier()
    d = Distiller(DistillationConfig(snapshot="train_begin", hardness=0.5, hidden_weight=0.5)).attach(student)
    before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    for seed in range(3):
        student(**_batch(seed=seed)).loss.backward()
        opt.step()
        opt.zero_grad()
    teacher_params = {id(p) for p in d.teacher.parameters()}
    assert all(p.grad is None and not p.requires_grad for p in d.teacher.parameters())
    assert teacher_params.isdisjoint(id(p) for g in opt.param_groups for p in g["params"])
    assert teacher_params.isdisjoint(id(p) for p in opt.state)
    assert all(torch.equal(before[k], v) for k, v in d.teacher.state_dict().items())
    assert not torch.equal(before["bert.encoder.layer.0.attention.self.query.weight"],
                           student.bert.encoder.layer[0].attention.self.query.weight)
    assert "distill/hidden_loss" in d.figures()


def _train_and_distance(distill: bool) -> float:
    """Fine-tune a copy on labels that disagree with the teacher's predictions; KL(teacher || student) after."""
    from prune_callbacks import Pruner, PruningConfig

    student = tiny_bert_classifier(seed=0)
    frozen = teacher_lib.snapshot(student)
    d = Distiller(DistillationConfig(teacher=frozen, hardness=1.0)).attach(student) if distill else None
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    Pruner(student, PruningConfig(final_sparsity=0.5, start_step=2, end_step=10, update_every=2), total_steps=12).attach(opt)
    for step in range(12):
        student(**_batch(seed=100 + step)).loss.backward()
        opt.step()
        opt.zero_grad()
    if d is not None:
        d.detach()
    student.eval()
    probe = {k: v for k, v in _batch(n=32, seed=999).items() if k != "labels"}
    with torch.no_grad():
        return kd_loss(student(**probe).logits, frozen(**probe).logits, temperature=1.0).item()


def test_distilled_student_stays_closer_to_the_teacher():
    with_kd, without = _train_and_distance(True), _train_and_distance(False)
    assert with_kd < 0.5 * without, (with_kd, without)


def test_distillation_core_does_not_import_transformers_and_is_exported():
    import subprocess
    import sys

    code = ("import sys, prune_callbacks.controllers.distillation, prune_callbacks; prune_callbacks.DistillationConfig; "
            "assert 'transformers' not in sys.modules and 'accelerate' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_snapshot_step_is_one_before_the_first_mask_update_and_refuses_l1_only():
    from prune_callbacks import Pruner
    from prune_callbacks.controllers.distillation.teacher import snapshot_step

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    pruner = Pruner(model, final_sparsity=0.5, start_step=4, end_step=8, update_every=2,
                    total_steps=10)
    assert snapshot_step(pruner) == pruner.first_update_step() - 1 == 3

    class NeverPrunes:
        def first_update_step(self):
            return None

    with pytest.raises(DistillationConfigError, match="train_begin"):
        snapshot_step(NeverPrunes())
