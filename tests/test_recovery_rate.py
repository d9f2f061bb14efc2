"""`PruningConfig.recovery_lr_scale`: a warm restart of the learning rate after a group's last mask update.

The optimizer steps at the scheduler's rate times the factor; the scheduler itself never sees it; on a linearly
decaying schedule it is the structured benchmarks' measured ``warm_restart`` once ramped in."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from prune_callbacks import Pruner, PruningConfig
from prune_callbacks.core.config import PruningConfigError

STEPS = 40


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


def _rates(config, *, steps=STEPS, schedule=None):
    """(rates the optimizer stepped with, rates its scheduler set) for a short run."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    sched = schedule(opt) if schedule else torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    pruner = Pruner(model, config, total_steps=steps).attach(opt)
    stepped, scheduled = [], []
    opt.register_step_pre_hook(lambda o, a, k: stepped.append(o.param_groups[0]["lr"]))  # after the pruner's
    x = torch.randn(steps, 4, 8, generator=torch.Generator().manual_seed(1))
    for i in range(steps):
        model(x[i]).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        scheduled.append(sched.get_last_lr()[0])
        sched.step()
    return stepped, scheduled, pruner


def _config(**kw):
    return PruningConfig(**{"final_sparsity": 0.5, "schedule": "oneshot", "start_step": 10, "include": ["0"], **kw})


def test_rate_is_scaled_after_the_cut_ramped_in_and_put_back():
    stepped, scheduled, pruner = _rates(_config(recovery_lr_scale=3.0))
    assert pruner.recovery[0].report() == {"recovery_lr_scale": 3.0, "after_step": 10, "ramp_steps": 3}
    factors = [a / b for a, b in zip(stepped, scheduled)]
    assert factors[:10] == [1.0] * 10  # steps 1..10: the cut happens after step 10
    assert factors[10:14] == pytest.approx([1.0, 2.0, 3.0, 3.0]) and factors[-1] == pytest.approx(3.0)
    assert scheduled == [1e-2] * STEPS  # the scheduler never saw the factor
    assert pruner.report()["lr_factor"] == 3.0 == pruner.lr_factor() and pruner.lr_factor(10) == 1.0


def test_off_by_default_and_equal_to_no_recovery():
    plain, _, pruner = _rates(_config())
    assert pruner.recovery == [] and plain == [1e-2] * STEPS and "lr_factor" not in pruner.report()


def test_gradual_window_recovers_after_its_last_update():
    _, _, pruner = _rates(_config(schedule="cubic", start_step=5, end_step=20, update_every=5, recovery_lr_scale=2.0))
    assert pruner.recovery[0].cut == 20 == pruner.groups[0].schedule.update_steps()[-1]


def test_equals_the_benchmarks_warm_restart_on_a_linear_schedule():
    """The lever the benchmarks measured (``--slim-lr``: restart to a peak at the cut) is this factor on a linearly
    decaying schedule: the same rates once ramped in, at most 11% above them on the ramp."""
    from benchmarks import common
    from prune_callbacks.methods.steps.recovery import ramp_steps

    steps, warmup, cut, peak = 150, 15, 50, 1.5
    scale = peak * (steps - warmup) / ((steps - cut) - ramp_steps(steps - cut))  # 2.25, the benchmarks' 3e-4 after 2e-4
    linear = lambda o: common.linear_warmup_decay(o, steps=steps, warmup=warmup)  # noqa: E731
    restart = lambda o: common.warm_restart(o, steps=steps, warmup=warmup, at=cut, peak=peak)  # noqa: E731
    ours, _, _ = _rates(_config(start_step=cut, recovery_lr_scale=scale), steps=steps, schedule=linear)
    theirs, _, _ = _rates(_config(start_step=cut), steps=steps, schedule=restart)
    assert ours[:cut] == theirs[:cut]
    assert ours[cut + 10:-1] == pytest.approx(theirs[cut + 10:-1])
    assert all(t <= o * (1 + 1e-9) and o <= t / 0.9 for o, t in zip(ours[cut:cut + 10], theirs[cut:cut + 10]))


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf])
def test_a_scale_that_is_not_a_positive_number_is_refused(value):
    with pytest.raises(PruningConfigError, match="recovery_lr_scale"):
        _config(recovery_lr_scale=value)


def test_a_cut_at_the_last_step_is_refused():
    with pytest.raises(PruningConfigError, match=r"recovery_lr_scale=2.0: the last mask update is at step 40 of a 40"):
        Pruner(_model(), _config(start_step=STEPS, recovery_lr_scale=2.0), total_steps=STEPS)


def test_needs_the_run_length_and_an_attached_optimizer():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    Pruner(model, _config(recovery_lr_scale=2.0)).attach(opt)  # int steps (no end_step read): no length needed
    model(torch.randn(4, 8)).sum().backward()
    with pytest.raises(PruningConfigError, match="the run's length is unknown"):
        opt.step()
    manual = Pruner(_model(), _config(recovery_lr_scale=2.0), total_steps=STEPS)
    with pytest.raises(RuntimeError, match=r"needs pruner.attach\(optimizer\)"):
        manual.before_optimizer_step()
