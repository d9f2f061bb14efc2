"""Bad configs are rejected with messages that name the field, the value and what is valid."""

import subprocess
import sys

import pytest
from pydantic import ValidationError

from prune_callbacks import PruningConfig
from prune_callbacks.core.config import PruningConfigError, make_config


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(final_sparsity=1.0), r"final_sparsity=1\.0 is invalid: must be in \[0, 1\)"),
        (dict(final_sparsity=-0.1), r"final_sparsity=-0\.1 is invalid"),
        (dict(initial_sparsity=0.95, final_sparsity=0.9), r"initial_sparsity=0\.95 is above final_sparsity=0\.9"),
        (dict(start_step=100, end_step=50), r"end_step=50 is before start_step=100"),
        (dict(start_step=0.8, end_step=0.2), r"end_step=0\.2 is before start_step=0\.8"),
        (dict(start_step=-3), r"start_step=-3 is invalid: an absolute step must be >= 0"),
        (dict(end_step=1.5), r"end_step=1\.5 is invalid: a float is a fraction of the run.*use an int"),
        (dict(update_every=0), r"update_every=0 is invalid: must be an integer >= 1"),
        (dict(beta=1.0), r"beta=1\.0 is invalid: an EMA factor must be in \[0, 1\)"),
        (dict(saliency="fisher"), r"saliency='fisher' is unknown; valid: taylor, platon, movement, magnitude, unit_taylor"),
        (dict(schedule="exp"), r"schedule='exp' is unknown; valid: cubic, linear, oneshot"),
        (dict(granularity="rows"), r"granularity='rows' is unknown; valid: unstructured, .*N:M"),
        (dict(granularity="4:2"), r"granularity: granularity='4:2' is invalid: N:M needs 0 < N < M"),
        (dict(granularity="2:4", final_sparsity=0.9), r"final_sparsity=0\.9 contradicts granularity='2:4'.*0\.5"),
        (dict(scope="layer"), r"scope.*'global' or 'per_layer'"),
        (dict(max_layer_sparsity=0.5, final_sparsity=0.9), r"max_layer_sparsity=0\.5 is below final_sparsity=0\.9"),
        (dict(min_layer_sparsity=0.95, final_sparsity=0.9), r"min_layer_sparsity=0\.95 is above final_sparsity"),
        (dict(include=["("]), r"include pattern '\(' is not a valid regex"),
        (dict(include=[]), r"include=\[\] selects nothing"),
        (dict(l1_lambda=-1.0), r"l1_lambda=-1\.0 is invalid: must be >= 0"),
        (dict(final_sparsity="high"), r"final_sparsity"),
        (dict(update_every=2.5), r"update_every"),
        (dict(schedule="oneshot", start_step=0.3, end_step=0.5),
         r"end_step=0\.5 does not apply to schedule='oneshot' \(it reads only start_step and final_sparsity\); "
         r"remove it"),
        (dict(schedule="oneshot", update_every=5), r"update_every=5 does not apply to schedule='oneshot'"),
        (dict(schedule="oneshot", initial_sparsity=0.2), r"initial_sparsity=0\.2 does not apply to schedule='oneshot'"),
        (dict(schedule="oneshot", update_every=5, accuracy_guard={"metric": "accuracy", "max_drop": 0.01},
              initial_sparsity=0.2), r"initial_sparsity=0\.2 does not apply to schedule='oneshot' \(it reads "
                                     r"end_step, update_every\)"),
        (dict(sparsity=0.9), r"sparsity: unknown key 'sparsity'; allowed keys: accuracy_guard, beta, .*final_sparsity"),
    ],
)
def test_bad_config_names_field_and_value(kwargs, expected):
    with pytest.raises(PruningConfigError, match="(?s)" + expected) as info:
        PruningConfig(**kwargs)
    assert isinstance(info.value, ValueError) and not isinstance(info.value, ValidationError)
    assert info.value.problems and all(path != "<root>" for path, _ in info.value.problems)


@pytest.mark.parametrize("kwargs", [
    dict(schedule="oneshot", start_step=0.3),
    dict(schedule="oneshot", start_step=0.8, end_step=0.7, update_every=25, initial_sparsity=0.0),  # defaults spelt out
    dict(schedule="oneshot", start_step=0.3, end_step=0.9, update_every=5,  # the guard's grid goes on past end_step
         accuracy_guard={"metric": "accuracy", "max_drop": 0.01}),
    dict(schedule="linear", start_step=0.3, end_step=0.5, update_every=5, initial_sparsity=0.2),
])
def test_a_schedule_takes_the_fields_it_reads(kwargs):
    PruningConfig(**kwargs)


def test_make_config_lists_every_offender_on_its_own_line():
    with pytest.raises(PruningConfigError) as info:
        make_config({"final_sparsity": 2.0, "saliensy": "taylor", "update_every": 0})
    message = str(info.value)
    assert "final_sparsity: final_sparsity=2.0 is invalid" in message
    assert "saliensy: unknown key 'saliensy'; allowed keys:" in message and "saliency" in message
    assert "update_every: update_every=0 is invalid" in message
    assert "Traceback" not in message


def test_config_is_not_silently_mutable_to_invalid():
    config = PruningConfig()
    with pytest.raises(PruningConfigError, match="final_sparsity=1.5 is invalid"):
        config.final_sparsity = 1.5


def test_resolve_fractions_and_reject_end_beyond_run():
    config = PruningConfig(final_sparsity=0.9, start_step=0.1, end_step=0.7, l1_ramp_steps=0.5)
    resolved = config.resolve(1000)
    assert (resolved.start_step, resolved.end_step, resolved.l1_ramp_steps) == (100, 700, 500)
    with pytest.raises(PruningConfigError, match=r"end_step=500 resolves to step 500, beyond the run's 300"):
        PruningConfig(start_step=10, end_step=500).resolve(300)


def test_defaults_are_valid_and_round_trip_through_json():
    config = PruningConfig()
    assert PruningConfig.model_validate_json(config.model_dump_json()) == config


def test_core_never_imports_transformers_or_accelerate():
    code = (
        "import sys, torch\n"
        "import prune_callbacks, prune_callbacks.engine.pruner, prune_callbacks.core.state_io\n"
        "from prune_callbacks import Pruner, PruningConfig\n"
        "from helpers import TinyLM\n"
        "Pruner(TinyLM(), PruningConfig(start_step=1, end_step=2)).report()\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'accelerate', 'datasets', 'evaluate'))\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    from pathlib import Path

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent)
    assert result.returncode == 0, result.stdout + result.stderr
