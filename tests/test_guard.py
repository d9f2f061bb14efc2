"""Accuracy guard: controller decisions on a synthetic task with a known breaking point, rollback, resume, config."""

import copy

import pytest
import torch
from torch import nn

from prune_callbacks import PruningConfig, Pruner
from prune_callbacks.core.config import PruningConfigError
from prune_callbacks.controllers.guard.controller import add_guards

S_STAR = 0.6


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(16, 16)) for _ in range(2)])

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def metric(pruner):
    """Fake accuracy: 0.9 up to s* = 0.6, collapses above it."""
    return 0.9 if pruner.mask_sparsity <= S_STAR + 1e-9 else 0.5


def run(steps, *, patience=2, every=5, stop_at=None, state=None, final_sparsity=0.95):
    torch.manual_seed(0)
    model = Blocks()
    cfg = PruningConfig(final_sparsity=final_sparsity, start_step=1, end_step=60, update_every=5, schedule="linear",
                        saliency="magnitude", include=[r"layers\.\d+\.0"],
                        accuracy_guard={"metric": "acc", "max_drop": 0.01, "every": every, "patience": patience})
    pruner = Pruner(model, cfg, total_steps=steps)
    (guard,) = add_guards(pruner)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner.attach(opt)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        pruner.load_state_dict(state["pruner"])
        guard.load_state_dict(state["guard"])
        start = pruner.step
    else:
        guard.set_baseline(metric(pruner))
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    for step in range(start + 1, steps + 1):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        if step % every == 0:
            guard.report_metric(metric(pruner), step)
        if stop_at is not None and step == stop_at:
            return {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict()),
                    "pruner": copy.deepcopy(pruner.state_dict()), "guard": copy.deepcopy(guard.state_dict())}
    final = guard.final_check(lambda: metric(pruner), steps)
    return model, pruner, guard, final


@pytest.mark.parametrize("patience", [1, 2, 3])
def test_stops_within_one_increment_of_breaking_point(patience):
    model, pruner, guard, final = run(200, patience=patience)
    decisions = [r["decision"] for r in guard.trajectory]
    assert "rollback" in decisions
    if patience > 1:
        assert "hold" in decisions
    assert final["met"] and final["sparsity"] <= S_STAR + 1e-9
    # within one (the smallest) increment of s*
    assert S_STAR - final["sparsity"] <= max(guard.increment, guard.config.min_increment) + 1e-6
    assert final["sparsity"] > 0.3
    # final answer measured at the final sparsity
    assert final["sparsity"] == pytest.approx(pruner.mask_sparsity)
    assert guard.trajectory[-1]["decision"] == "final" and guard.trajectory[-1]["sparsity"] == final["sparsity"]
    assert pruner.report()["global_sparsity"] == pytest.approx(final["sparsity"], abs=0.01)


def test_final_check_rolls_back_a_failing_end_state():
    _, pruner, guard, _ = run(60, patience=5, every=1000)  # never reports during the run: no recovery at all
    # every=1000: no decisions taken, the run ends at 0.95 which fails -> rolled back to the last good (dense)
    assert guard.final["sparsity"] == 0.0 and guard.final["met"]
    assert [r["decision"] for r in guard.trajectory][-2:] == ["rollback", "final"]


def test_rollback_restores_values_bitwise():
    torch.manual_seed(0)
    model = Blocks()
    cfg = PruningConfig(final_sparsity=0.9, start_step=1, end_step=3, update_every=1, schedule="linear",
                        saliency="magnitude", include=[r"layers\.\d+\.0"], accuracy_guard={"metric": "acc", "patience": 1})
    pruner = Pruner(model, cfg, total_steps=10)
    (guard,) = add_guards(pruner)
    guard.set_baseline(1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the weights only change by pruning
    pruner.attach(opt)
    x = torch.randn(4, 16)

    def step():
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()

    step()
    guard.report_metric(1.0, 1)  # good at the first masks
    good = [p.detach().clone() for p in pruner.params]
    good_masks = [m.clone() for m in pruner.pruned]
    step(); step()
    assert pruner.mask_sparsity > guard.good_sparsity
    assert guard.report()["snapshot_bytes"] == 4 * sum(int((m & ~g).sum()) for m, g in zip(pruner.pruned, good_masks)) \
        + sum(m.numel() for m in good_masks)
    assert guard.report_metric(0.0, 3) == "rollback"
    for p, g, m, gm in zip(pruner.params, good, pruner.pruned, good_masks):
        assert torch.equal(m, gm)
        assert torch.equal(p.detach().view(torch.int32), g.view(torch.int32))  # bitwise


@pytest.mark.parametrize("stop_at", [40, 45, 50, 55, 70])
def test_resume_mid_hold_or_rollback_reproduces_the_run(stop_at):
    m1, p1, g1, f1 = run(120, patience=3)
    state = run(120, patience=3, stop_at=stop_at)
    m2, p2, g2, f2 = run(120, patience=3, state=state)
    assert g1.trajectory == g2.trajectory and f1 == f2
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_points_cover_hold_and_rollback():
    _, _, guard, _ = run(120, patience=3)
    by_step = {r["step"]: r["decision"] for r in guard.trajectory}
    assert (by_step[45], by_step[50], by_step[55], by_step[70]) == ("hold", "hold", "rollback", "rollback"), by_step


@pytest.mark.parametrize("guard, field, value", [
    ({"max_drop": -0.1}, "max_drop", "-0.1"),
    ({"every": 0}, "every", "0"),
    ({"patience": 0}, "patience", "0"),
    ({"mode": "up"}, "mode", "up"),
    ({"metrik": "x"}, "metrik", "x"),
])
def test_bad_settings_are_clear_errors(guard, field, value):
    with pytest.raises(PruningConfigError) as exc:
        PruningConfig(accuracy_guard=guard)
    assert f"accuracy_guard.{field}" in str(exc.value)


@pytest.mark.parametrize("name, mode, minimise", [("eval_accuracy", None, False), ("eval_loss", None, True),
                                                  ("eval_perplexity", None, True), ("eval_loss", "max", False)])
def test_mode(name, mode, minimise):
    cfg = PruningConfig(accuracy_guard={"metric": name, "mode": mode}).accuracy_guard
    assert cfg.minimise is minimise
    assert cfg.passes(1.0, 1.0) and cfg.passes(1.0 + (0.005 if minimise else -0.005), 1.0)
    assert not cfg.passes(1.0 + (0.02 if minimise else -0.02), 1.0)
