"""N:M granularity: exact N kept per group at the end, gradual path, zeros stay zero, resume, layouts."""

import copy

import pytest
import torch

from helpers import TinyLM, lm_loss, random_batches
from prune_callbacks import Pruner, PruningConfig
from prune_callbacks.core.config import PruningConfigError
from prune_callbacks.methods.granularity import NM
from prune_callbacks.export.semi_structured import is_2to4, to_semi_structured

CFG = dict(start_step=3, end_step=30, update_every=3)


def _train(model, pruner, steps, seed=0, check=None):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    pruner.attach(opt)
    for ids in random_batches(steps, seed=seed):
        lm_loss(model, ids).backward()
        opt.step()
        opt.zero_grad()
        if check:
            check(pruner)
    return opt


def _group_view(mask, m):
    return mask.reshape(-1, m)


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
def test_every_group_keeps_exactly_n_and_zeros_stay_zero(pattern):
    n, m = map(int, pattern.split(":"))
    torch.manual_seed(0)
    model = TinyLM()
    config = PruningConfig(granularity=pattern, **CFG)
    assert config.final_sparsity == pytest.approx(1 - n / m)
    pruner = Pruner(model, config)

    def check(p):
        for param, mask in zip(p.params, p.pruned):
            assert torch.equal(param[mask], torch.zeros_like(param[mask])) and not torch.signbit(param[mask]).any()
            assert int(_group_view(mask, m).sum(-1).max()) <= m - n  # never more than M-N pruned in a group

    _train(model, pruner, 200, check=check)
    pruner.finalize()
    for param, mask in zip(pruner.params, pruner.pruned):
        assert torch.equal(_group_view(~mask, m).sum(-1), torch.full((mask.numel() // m,), n))
        assert int((_group_view(param, m) != 0).sum(-1).max()) <= n
    assert pruner.report()["global_sparsity"] == pytest.approx(1 - n / m)


def test_path_is_gradual_and_follows_the_schedule():
    torch.manual_seed(0)
    model = TinyLM()
    pruner = Pruner(model, PruningConfig(granularity="2:4", **CFG))
    seen = []
    _train(model, pruner, 31, check=lambda p: seen.append(p.report()["global_sparsity"]))
    assert seen == sorted(seen) and 0 < seen[6] < 0.5 and len(set(seen)) >= 8
    for step, value in enumerate(seen, start=1):
        if pruner.schedule.is_update_step(step):
            assert value == pytest.approx(pruner.schedule.value(step), abs=2e-3)


def test_conv1d_groups_run_along_the_input_dimension():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16))
    pruner = Pruner(model, PruningConfig(granularity="2:4", start_step=1, schedule="oneshot"))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    pruner.attach(opt)
    ids = torch.randint(0, 50, (2, 8))
    model(ids, labels=ids).loss.backward()
    opt.step()
    for target, mask in zip(pruner.targets, pruner.pruned):
        assert target.transposed
        # Conv1D weight is [in, out]: groups of 4 consecutive *inputs* of one output column
        assert torch.equal((~mask).t().reshape(-1, 4).sum(-1), torch.full((mask.numel() // 4,), 2))


def test_input_dimension_not_a_multiple_of_m_lists_targets_and_the_fix():
    model = TinyLM(hidden=30)
    with pytest.raises(ValueError, match=r"multiple of 4.*layers\.0\.down\.weight \(input dimension 30\).*exclude"):
        Pruner(model, PruningConfig(granularity="2:4"), total_steps=100)
    Pruner(model, PruningConfig(granularity="2:4", exclude=[r"\.down$"]), total_steps=100)  # the suggested fix works


def test_resume_is_exact():
    def run(split):
        torch.manual_seed(0)
        model = TinyLM()
        pruner = Pruner(model, PruningConfig(granularity="2:4", **CFG))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        pruner.attach(opt)
        for i, ids in enumerate(random_batches(40, seed=3)):
            if i == split:
                state, m_state, o_state = pruner.state_dict(), copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
                model = TinyLM()
                model.load_state_dict(m_state)
                opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
                opt.load_state_dict(o_state)
                pruner = Pruner(model, PruningConfig(granularity="2:4", **CFG))
                pruner.load_state_dict(state)
                pruner.attach(opt)
            lm_loss(model, ids).backward()
            opt.step()
            opt.zero_grad()
        return [m.clone() for m in pruner.pruned], [p.detach().clone() for p in pruner.params]

    masks_a, params_a = run(split=-1)
    masks_b, params_b = run(split=17)
    assert all(torch.equal(a, b) for a, b in zip(masks_a, masks_b))
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))


def test_nm_with_unstructured_in_one_run_and_overlap_refused():
    torch.manual_seed(0)
    model = TinyLM()
    pruner = Pruner(model, [PruningConfig(granularity="2:4", include=[r"\.up$"], **CFG),
                            PruningConfig(final_sparsity=0.8, include=[r"\.down$"], **CFG)])
    _train(model, pruner, 35)
    groups = pruner.report()["groups"]
    assert [g["granularity"] for g in groups] == ["2:4", "unstructured"]
    per = pruner.report()["per_target"]
    assert all(per[f"layers.{i}.up"]["sparsity"] == 0.5 for i in range(3))
    down = sum(per[f"layers.{i}.down"]["pruned"] for i in range(3)) / sum(per[f"layers.{i}.down"]["numel"] for i in range(3))
    assert down == pytest.approx(0.8, abs=1e-3)
    with pytest.raises(PruningConfigError, match=r"same weights.*layers\.0\.up\.weight"):
        Pruner(TinyLM(), [PruningConfig(granularity="2:4"), PruningConfig(include=[r"\.up$"])], total_steps=100)


def test_groups_kept_helper_and_2to4_check():
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 3.0, 4.0]])
    assert is_2to4(w) and not is_2to4(torch.ones(1, 8))
    nm = NM.__new__(NM)
    nm.m = 4
    mask = w == 0
    assert nm.groups_kept.__func__(nm, mask, type("T", (), {"transposed": False})()).tolist() == [2, 2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_to_semi_structured_refuses_cpu_clearly():
    with pytest.raises(RuntimeError, match="needs a CUDA GPU with sparse tensor cores"):
        to_semi_structured(TinyLM())
