"""Accuracy guard in a single-process Accelerate loop: ``register(..., evaluate=fn)`` (synthetic breaking point)."""

from __future__ import annotations

import pytest
import torch
from helpers import TinyLM, lm_loss, random_batches, reset_accelerate_state

pytest.importorskip("accelerate")
from accelerate import Accelerator  # noqa: E402

from prune_callbacks import PruningConfig, figures  # noqa: E402
from prune_callbacks.integrations.accelerate.hook import AcceleratePruningHook  # noqa: E402

S_STAR = 0.6
STEPS = 120
GUARD = {"metric": "eval_acc", "max_drop": 0.01, "every": 5, "patience": 3}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    reset_accelerate_state()
    yield
    reset_accelerate_state()


def config(**guard):
    return PruningConfig(final_sparsity=0.95, start_step=1, end_step=60, update_every=5, schedule="linear",
                         saliency="magnitude", include=[r"layers\.\d+\.(up|down)"], accuracy_guard={**GUARD, **guard})


def synthetic_accuracy(hook):
    """Fake accuracy: 0.9 up to s*, 0.5 above it."""
    return {"eval_acc": 0.9 if hook.pruner.mask_sparsity <= S_STAR + 1e-9 else 0.5, "eval_loss": 1.0}


def run(tmp_path, *, stop_at=None, resume=False, cfg=None, metrics=synthetic_accuracy):
    """Train STEPS optimizer steps; ``stop_at``: save_state there and stop; ``resume``: load_state first."""
    reset_accelerate_state()
    acc = Accelerator(cpu=True, project_dir=str(tmp_path))
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model, opt = acc.prepare(model, opt)
    hook = AcceleratePruningHook(cfg or config(), total_steps=STEPS)
    calls = []

    def evaluate():
        calls.append((hook.pruner.step, model.training))
        model.eval()  # what an evaluation loop does; the hook puts the model back in train mode
        return metrics(hook)

    pruner = hook.register(acc, model, opt, evaluate=evaluate)
    if resume:
        acc.load_state(str(tmp_path / "ckpt"))
    batches = random_batches(STEPS, batch=4, seed=1)
    for ids in batches[pruner.step:]:
        with acc.accumulate(model):
            acc.backward(lm_loss(model, ids))
            opt.step()
            opt.zero_grad()
        if pruner.step == stop_at:
            acc.save_state(str(tmp_path / "ckpt"))
            return hook, calls
    report = hook.finalize()
    return hook, calls, report, [p.detach().clone() for p in acc.unwrap_model(model).parameters()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One uninterrupted guarded run, shared by the result and resume tests."""
    return run(tmp_path_factory.mktemp("guard_acc_full"))


def test_stops_near_the_breaking_point_and_answers_at_the_final_sparsity(full_run):
    hook, calls, report, _ = full_run
    (guard,) = report["accuracy_guard"]
    traj = guard["trajectory"]
    assert traj[0] == {"step": 0, "sparsity": 0.0, "metric": 0.9, "decision": "baseline"}  # before the first step
    decisions = [r["decision"] for r in traj]
    assert "hold" in decisions and "rollback" in decisions, traj
    # evaluations: baseline, then every 5 steps once masks exist, then the final check (all in eval mode restored)
    steps = [s for s, _ in calls]
    assert steps[0] == 0 and all(s % 5 == 0 for s in steps[1:-1]) and steps[-1] == STEPS
    assert all(training for _, training in calls)  # the hook restored train mode after each evaluation
    final = guard["final"]
    assert final["met"] and 0.5 < final["sparsity"] <= S_STAR + 1e-9
    assert traj[-1] == {"step": STEPS, "sparsity": final["sparsity"], "metric": final["metric"], "decision": "final"}
    assert report["global_sparsity"] == pytest.approx(final["sparsity"], abs=0.01)
    assert all(torch.all(t.param[m] == 0) for t, m in zip(hook.pruner.targets, hook.pruner.pruned))
    values = hook.log_values()
    assert values[figures.GUARD_DECISION] == figures.GUARD_DECISION_CODES["final"]
    assert values[figures.GUARD_SPARSITY] == final["sparsity"]


@pytest.mark.parametrize("stop_at", [45, 55, 70])
def test_resume_mid_hold_or_rollback_reproduces_the_run(full_run, tmp_path, stop_at):
    _, _, full_report, full_weights = full_run
    by_step = {r["step"]: r["decision"] for r in full_report["accuracy_guard"][0]["trajectory"]}
    assert by_step[stop_at] in ("hold", "rollback"), by_step  # the checkpoint is taken inside a hold / at a rollback
    part, _ = run(tmp_path / "part", stop_at=stop_at)
    resumed, calls, report, weights = run(tmp_path / "part", resume=True)
    assert calls[0][0] > stop_at  # no second baseline after load_state
    assert report["accuracy_guard"] == full_report["accuracy_guard"]
    for a, b in zip(full_weights, weights):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cfg, evaluate, error, match", [
    ("guarded", None, ValueError, "needs register"),
    ("plain", "fn", ValueError, "only used with accuracy_guard"),
    ("guarded", "not callable", TypeError, "needs a callable"),
])
def test_register_errors(tmp_path, cfg, evaluate, error, match):
    acc = Accelerator(cpu=True)
    model = TinyLM()
    model, opt = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    hook = AcceleratePruningHook(config() if cfg == "guarded" else PruningConfig(final_sparsity=0.5), total_steps=STEPS)
    with pytest.raises(error, match=match):
        hook.register(acc, model, opt, evaluate=(lambda: {}) if evaluate == "fn" else evaluate)


def test_metric_never_returned_fails_before_any_weight_changes(tmp_path):
    with pytest.raises(ValueError, match=r"eval_acc.*it returned: eval_loss"):
        run(tmp_path, metrics=lambda hook: {"eval_loss": 1.0})


def test_loss_like_metric_is_guarded_downwards(tmp_path):
    cfg = config(metric="eval_loss")
    assert cfg.accuracy_guard.minimise  # lower is better: 1.0 up to s*, 2.0 above

    def loss(hook):
        return {"eval_loss": 1.0 if hook.pruner.mask_sparsity <= S_STAR + 1e-9 else 2.0}

    _, _, report, _ = run(tmp_path, cfg=cfg, metrics=loss)
    final = report["accuracy_guard"][0]["final"]
    assert final["met"] and final["metric"] == 1.0 and 0.5 < final["sparsity"] <= S_STAR + 1e-9


@pytest.mark.parametrize("when, step", [("train_begin", 0), ("before_pruning", 9)])
def test_baseline_timing(tmp_path, when, step):
    """start_step 10: the first masks come with step 10; before_pruning measures the model after step 9."""
    seen = []

    def metrics(hook):
        seen.append((hook.pruner.step, hook.pruner.mask_updates))
        return synthetic_accuracy(hook)

    cfg = PruningConfig(**{**config().model_dump(), "start_step": 10, "accuracy_guard": {**GUARD, "baseline": when}})
    _, _, report, _ = run(tmp_path, cfg=cfg, metrics=metrics)
    assert report["accuracy_guard"][0]["trajectory"][0]["step"] == step
    assert seen[0] == (step, 0)  # measured on the dense model
