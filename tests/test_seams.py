"""The engine's seams: registry (Python and YAML), schedules with state, L1 alone, several configs,
settings that do not apply, and the newcomer's silent-damage cases (issue 11) in the core."""

import logging
import textwrap

import pytest
import torch

from helpers import TinyLM, lm_loss, random_batches
from prune_callbacks import Pruner, PruningConfig
from prune_callbacks.core.config import L1Config, PruningConfigError
from prune_callbacks.core.registry import SALIENCIES, SCHEDULES, register_saliency, register_schedule
from prune_callbacks.methods.saliency import Saliency
from prune_callbacks.methods.schedule import Schedule
from prune_callbacks.methods.steps.pruning import NoInformationError

CFG = dict(final_sparsity=0.6, start_step=2, end_step=12, update_every=2)


def _train(model, pruner, steps, opt=None):
    opt = opt or torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruner.attach(opt)
    for ids in random_batches(steps):
        lm_loss(model, ids).backward()
        opt.step()
        opt.zero_grad()
    return opt


@pytest.fixture
def custom_parts():
    @register_saliency("anti_magnitude_test")
    class AntiMagnitude(Saliency):  # prunes the *largest* weights: easy to tell apart from magnitude
        needs_gradients = False

        def scores(self, params):
            return [-p.detach().abs().float() for p in params]

    @register_schedule("step_test")
    class StepSchedule(Schedule):  # half of final at start, final at end
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.calls = 0

        def progress(self, fraction):
            self.calls += 1
            return 0.5

        def state_dict(self):
            return {"calls": self.calls}

        def load_state_dict(self, state):
            self.calls = state.get("calls", 0)

    yield AntiMagnitude, StepSchedule
    SALIENCIES._items.pop("anti_magnitude_test")
    SCHEDULES._items.pop("step_test")


def test_registered_parts_work_from_python(custom_parts):
    torch.manual_seed(0)
    model = TinyLM()
    pruner = Pruner(model, PruningConfig(saliency="anti_magnitude_test", schedule="step_test", **CFG))
    _train(model, pruner, 6)
    assert pruner.report()["mask_sparsity"] == pytest.approx(0.3)  # the custom schedule's half-way value
    fresh = Pruner(TinyLM(), PruningConfig(saliency="anti_magnitude_test", **CFG))
    before = [p.detach().abs().clone() for p in fresh.params]
    fresh.update_masks(0.4)
    pruned = torch.cat([b[m] for b, m in zip(before, fresh.pruned)])
    kept = torch.cat([b[~m] for b, m in zip(before, fresh.pruned)])
    assert pruned.min() >= kept.max()  # the custom score was used: the largest weights went
    assert pruner.state_dict()["groups"][0]["schedule"]["calls"] > 0  # the schedule's own state is saved


def test_registered_parts_work_from_yaml(custom_parts, tmp_path):
    from prune_callbacks.recipe.loading import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent("""\
        task: sequence-classification
        model: {source: builtin, name: minilm}
        data: {source: builtin, name: rotten_tomatoes}
        pruning: {saliency: anti_magnitude_test, schedule: step_test, final_sparsity: 0.5}
    """))
    recipe = load_recipe(path)
    assert (recipe.pruning.saliency, recipe.pruning.schedule) == ("anti_magnitude_test", "step_test")
    path.write_text(path.read_text().replace("anti_magnitude_test", "nonexistent_test"))
    with pytest.raises(ValueError, match=r"saliency='nonexistent_test' is unknown; valid: taylor.*anti_magnitude_test"):
        load_recipe(path)


def test_register_refuses_a_silent_overwrite():
    with pytest.raises(ValueError, match="already registered"):
        register_saliency("taylor", type("Other", (Saliency,), {}))


@pytest.mark.parametrize("kwargs, field", [
    (dict(saliency="magnitude", beta=0.5), "beta"),
    (dict(saliency="taylor", uncertainty_beta=0.5), "uncertainty_beta"),
    (dict(saliency="movement", beta=0.9), "beta"),
    (dict(scope="per_layer", min_layer_sparsity=0.1), "min_layer_sparsity"),
    (dict(scope="per_layer", max_layer_sparsity=0.99), "max_layer_sparsity"),
    (dict(granularity="2:4", scope="per_layer"), "scope"),
    (dict(granularity="2:4", max_layer_sparsity=0.9, final_sparsity=0.5), "max_layer_sparsity"),
])
def test_settings_that_do_not_apply_are_errors_naming_the_field(kwargs, field):
    with pytest.raises(PruningConfigError, match=rf"{field}=.*does not apply") as info:
        PruningConfig(**kwargs)
    assert field in [path for path, _ in info.value.problems]


def test_a_registered_schedule_says_which_window_fields_it_reads():
    @register_schedule("late_test")
    class Late(Schedule):  # dense until end_step, then final at once: reads end_step only
        reads = frozenset({"end_step"})

        def progress(self, fraction):
            return 0.0

    try:
        config = PruningConfig(schedule="late_test", start_step=2, end_step=8, final_sparsity=0.5)
        assert config.build_schedule(config.resolve(None)).value(8) == 0.5
        refusal = r"update_every=5 does not apply to schedule='late_test' \(it reads end_step\)"
        with pytest.raises(PruningConfigError, match=refusal) as info:
            PruningConfig(schedule="late_test", update_every=5, initial_sparsity=0.1, final_sparsity=0.5)
        assert [path for path, _ in info.value.problems] == ["initial_sparsity", "update_every"]  # every offender
    finally:
        SCHEDULES._items.pop("late_test")


def test_defaults_that_do_not_apply_are_unused_not_errors():
    PruningConfig(saliency="magnitude")  # beta keeps its default: fine
    PruningConfig(saliency="magnitude", beta=0.85)  # spelling out the default (template.yaml does) is fine too


def test_schedule_objects_own_update_steps():
    config = PruningConfig(**CFG)
    schedule = config.build_schedule(config.resolve(None))
    assert schedule.update_steps() == [2, 4, 6, 8, 10, 12]
    assert schedule.first_update_step() == 2 and schedule.value(12) == 0.6
    one = PruningConfig(schedule="oneshot", start_step=0, final_sparsity=0.5)
    assert one.build_schedule(one.resolve(10)).update_steps() == [1]


@pytest.mark.parametrize("total, every", [(30, 2), (60, 4), (300, 25), (1000, 25)])
def test_short_runs_get_a_shorter_default_update_interval(total, every):
    resolved = PruningConfig().resolve(total)  # default window 0.1 .. 0.7
    assert resolved.update_every == every
    assert PruningConfig(update_every=25).resolve(total).update_every == 25  # what the user sets stands


def test_l1_on_its_own_needs_no_pruning_config():
    torch.manual_seed(0)
    model = TinyLM()
    pruner = Pruner(model, L1Config(l1_lambda=0.5))
    _train(model, pruner, 8)
    report = pruner.report()
    assert report["l1"]["zero_fraction"] > 0.05 and report["pruned_params"] == 0
    with pytest.raises(PruningConfigError, match="l1_lambda=0.0 is invalid"):
        L1Config(l1_lambda=0.0)


def test_several_configs_and_their_state_round_trip():
    def build():
        torch.manual_seed(0)
        model = TinyLM()
        return model, Pruner(model, [PruningConfig(include=[r"\.up$"], **CFG),
                                     dict(include=[r"\.down$"], saliency="magnitude", **{**CFG, "final_sparsity": 0.3})])

    model, pruner = build()
    _train(model, pruner, 12)
    state = pruner.state_dict()
    assert [g["mask_sparsity"] for g in state["groups"]] == [0.6, 0.3]
    model2, pruner2 = build()
    pruner2.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(pruner.pruned, pruner2.pruned))


# ------------------------------------------------------------------ issue 11: silent damage
def test_forgetting_before_optimizer_step_is_refused_not_pruned_by_position():
    torch.manual_seed(0)
    model = TinyLM()
    pruner = Pruner(model, PruningConfig(**CFG))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with pytest.raises(NoInformationError, match=r"before_optimizer_step\(\)"):
        for ids in random_batches(4):
            lm_loss(model, ids).backward()
            opt.step()
            pruner.after_optimizer_step(opt)  # before_optimizer_step() forgotten
            opt.zero_grad()
    assert pruner.report()["pruned_params"] == 0


def test_zero_gradients_are_refused():
    torch.manual_seed(0)
    model = TinyLM()
    pruner = Pruner(model, PruningConfig(**CFG))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with pytest.raises(NoInformationError, match="same 'taylor' score"):
        for ids in random_batches(4):
            lm_loss(model, ids).backward()
            opt.zero_grad()  # gradients gone before the pruner sees them
            pruner.before_optimizer_step()
            opt.step()
            pruner.after_optimizer_step(opt)


def test_report_after_finalize_measures_the_weights():
    torch.manual_seed(0)
    model = TinyLM()
    pruner = Pruner(model, PruningConfig(**CFG))
    opt = _train(model, pruner, 12)
    pruner.finalize()
    assert pruner.report()["finalized"] and pruner.report()["global_sparsity"] == pytest.approx(0.6, abs=1e-3)
    for ids in random_batches(3):  # training on after finalize revives weights ...
        lm_loss(model, ids).backward()
        opt.step()
        opt.zero_grad()
    assert pruner.report()["global_sparsity"] < 0.1  # ... and the report says so


def test_resuming_a_state_of_another_saliency_is_refused_and_changes_warned(caplog):
    torch.manual_seed(0)
    model = TinyLM()
    pruner = Pruner(model, PruningConfig(**CFG))
    _train(model, pruner, 4)
    state = pruner.state_dict()
    with pytest.raises(ValueError, match=r"cannot be resumed: it was written with saliency='taylor', this config has saliency='platon'"):
        Pruner(TinyLM(), PruningConfig(**CFG, saliency="platon")).load_state_dict(state)
    with pytest.raises(ValueError, match=r"granularity='unstructured', this config has granularity='2:4'"):
        Pruner(TinyLM(), PruningConfig(**{**CFG, "final_sparsity": 0.5}, granularity="2:4")).load_state_dict(state)
    with caplog.at_level(logging.WARNING, logger="prune_callbacks.engine.pruner"):
        Pruner(TinyLM(), PruningConfig(**CFG, beta=0.9)).load_state_dict(state)
    assert "beta: 0.85 -> 0.9" in caplog.text


@pytest.mark.parametrize("bad", ["bert-base-uncased", None, 3])
def test_wrong_model_argument_is_a_type_error(bad):
    with pytest.raises(TypeError, match="needs the torch.nn.Module to prune"):
        Pruner(bad, PruningConfig(**CFG))


def test_wrong_config_argument_is_a_type_error():
    with pytest.raises(TypeError, match="expected a PruningConfig, a dict of its fields or None"):
        Pruner(TinyLM(), "final_sparsity=0.9")


def test_no_target_messages_say_the_real_cause():
    with pytest.raises(ValueError, match=r"exclude=\['layers'\] removed every candidate"):
        Pruner(TinyLM(), PruningConfig(**CFG, exclude=["layers"]))
    with pytest.raises(ValueError, match="every selected weight is tied"):
        from prune_callbacks.core.targets import find_targets

        class OnlyTied(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4, bias=False)])
                self.emb = torch.nn.Embedding(4, 4)
                self.layers[0].weight = self.emb.weight

        find_targets(OnlyTied())


def test_set_total_steps_re_resolves_every_l1_ramp():
    pruner = Pruner(TinyLM(), [PruningConfig(**CFG, l1_lambda=0.1, l1_ramp_steps=0.5, include=[r"\.up$"]),
                               L1Config(l1_lambda=0.1, l1_ramp_steps=0.25, include=[r"\.down$"])], total_steps=20)
    assert sorted(c.ramp_steps for c in pruner.l1) == [5, 10]
    pruner.set_total_steps(100)
    assert sorted(c.ramp_steps for c in pruner.l1) == [25, 50]
