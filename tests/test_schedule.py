"""Schedules against hand-computed values (Zhu & Gupta 2017)."""

import pytest

from prune_callbacks.methods.schedule import is_update_step, l1_strength, target_sparsity

CUBIC = dict(initial=0.0, final=0.9, start=10, end=110, kind="cubic")


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.0),
        (9, 0.0),
        (10, 0.0),  # s_i at t0
        (35, 0.9 - 0.9 * 0.75**3),  # 0.52031...
        (60, 0.9 - 0.9 * 0.5**3),  # 0.7875
        (85, 0.9 - 0.9 * 0.25**3),  # 0.8859375
        (110, 0.9),
        (500, 0.9),  # held after t1
    ],
)
def test_cubic_hand_values(step, expected):
    assert target_sparsity(step, **CUBIC) == pytest.approx(expected, abs=1e-12)


def test_cubic_literal_numbers():
    # 0.9 + (0 - 0.9) * (1 - 25/100)^3 = 0.9 - 0.9 * 0.421875 = 0.5203125
    assert target_sparsity(35, **CUBIC) == pytest.approx(0.5203125)
    assert target_sparsity(60, **CUBIC) == pytest.approx(0.7875)


def test_cubic_with_initial_sparsity():
    # s_i = 0.5, s_f = 0.9, halfway: 0.9 + (0.5 - 0.9) * 0.125 = 0.85
    assert target_sparsity(50, initial=0.5, final=0.9, start=0, end=100) == pytest.approx(0.85)


@pytest.mark.parametrize("step, expected", [(9, 0.0), (10, 0.2), (60, 0.5), (110, 0.8), (200, 0.8)])
def test_linear(step, expected):
    assert target_sparsity(step, initial=0.2, final=0.8, start=10, end=110, kind="linear") == pytest.approx(expected)


def test_oneshot():
    kw = dict(initial=0.0, final=0.7, start=5, end=5, kind="oneshot")
    assert [target_sparsity(s, **kw) for s in (4, 5, 6)] == [0.0, 0.7, 0.7]
    assert [s for s in range(20) if is_update_step(s, start=5, end=5, every=3, kind="oneshot")] == [5]


def test_monotone_non_decreasing():
    for kind in ("cubic", "linear"):
        values = [target_sparsity(s, initial=0.1, final=0.95, start=3, end=97, kind=kind) for s in range(120)]
        assert all(b >= a for a, b in zip(values, values[1:]))


def test_update_steps_include_end():
    steps = [s for s in range(0, 60) if is_update_step(s, start=10, end=45, every=10)]
    assert steps == [10, 20, 30, 40, 45]


def test_update_steps_start_zero_waits_for_first_step():
    steps = [s for s in range(0, 12) if is_update_step(s, start=0, end=10, every=5)]
    assert steps == [5, 10]


def test_l1_ramp():
    assert [l1_strength(s, l1_lambda=0.4, ramp_steps=4) for s in (0, 1, 2, 4, 10)] == [0.0, 0.1, 0.2, 0.4, 0.4]
    assert l1_strength(3, l1_lambda=0.4, ramp_steps=0) == 0.4
    assert l1_strength(3, l1_lambda=0.0, ramp_steps=10) == 0.0
