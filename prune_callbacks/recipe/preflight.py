"""Every check that can run before training, in one place: ``validate`` and ``finetune`` call the same one.

``check_recipe(recipe)`` (``validate``): the output directory (`lifecycle.plan_output`), the
pruning state a resumed run reads (`check_resume_state`), the accuracy guard's metric against the
keys the evaluation returns (`check_guard_metrics`), and the data when it is on this machine
(local files, built-in assets): splits, columns, labels.
``check_recipe(recipe, load_model=True)`` (``validate --load``, and ``finetune`` before it trains):
also opens hub data, loads the model and tokenizer, checks ``data.max_length`` against the model
and builds the Pruner(s) on the model, which checks ``include`` / ``exclude`` and the targets (and,
with ``output.slim``, that the structured widths can be cut uniformly); a distillation teacher given
as a folder is checked against the student from its ``config.json`` (`check_teacher`).
``finetune`` then trains on exactly what was checked (the returned `Preflight` holds it), so it
cannot reject what ``validate --load`` accepted; ``validate`` without ``--load`` checks everything
but what needs the model (and hub data, which needs the network).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from prune_callbacks.core.state_io import STATE_FILE
from prune_callbacks.recipe.lifecycle import OutputPlan, plan_output
from prune_callbacks.recipe.errors import RecipeError
from prune_callbacks.recipe.schema import METRICS, Recipe


@dataclass
class Preflight:
    recipe: Recipe
    plan: OutputPlan
    data_checked: bool = False
    train_raw: Any = None
    eval_raw: Any = None
    label_names: Optional[list[str]] = None
    label_map: Optional[dict] = None
    model: Any = None
    tokenizer: Any = None
    notes: list[str] = field(default_factory=list)  # what was not checked, for validate's OK line
    advice: list[str] = field(default_factory=list)  # warnings about the recipe that do not stop it (validate --load)


def seed_of(recipe: Recipe) -> int:
    return int(recipe.training.get("seed", 42))


def check_recipe(recipe: Recipe, *, load_model: bool = False) -> Preflight:
    """Run the checks (see the module docstring); raises RecipeError naming the recipe field (and its line)."""
    try:
        return _check(recipe, load_model)
    except RecipeError as exc:
        if recipe._origin is None:
            raise
        raise exc.located(*recipe._origin) from None


def _check(recipe: Recipe, load_model: bool) -> Preflight:
    pre = Preflight(recipe, plan_output(recipe, needs_pruning_state=True))
    check_callbacks(recipe)
    check_guard_metrics(recipe)
    if pre.plan.resume_from is not None:
        check_resume_state(pre.plan.resume_from)
    if load_model or recipe.data.source != "hub":
        from prune_callbacks.recipe.data import load_data
        from prune_callbacks.recipe.models import quiet_transformers

        with quiet_transformers():
            pre.train_raw, pre.eval_raw, pre.label_names, pre.label_map = load_data(recipe, seed_of(recipe))
        pre.data_checked = True
    else:
        pre.notes.append("hub data not opened (validate --load opens it)")
    if load_model:
        from prune_callbacks.recipe.models import load_model as _load

        from prune_callbacks.recipe.models import quiet_transformers

        with quiet_transformers():
            pre.model, pre.tokenizer = _load(recipe, pre.label_names)
        pre.advice = check_model(recipe, pre.model, pre.tokenizer)
    else:
        pre.notes.append("model not loaded (validate --load checks the targets)")
    return pre


def check_callbacks(recipe: Recipe) -> None:
    """The Trainer callbacks accept the pruning section (no model needed: nothing is built on one)."""
    from prune_callbacks.integrations.trainer import make_callbacks

    try:
        make_callbacks(recipe.pruning)
    except (ValueError, TypeError) as exc:  # PruningConfigError is a ValueError
        many = isinstance(recipe.pruning, list)
        what = (f"a list of {len(recipe.pruning)} pruning configs is not accepted by the Trainer callbacks of this "
                "version (make_callbacks([...]))" if many else "the pruning config is not accepted by the Trainer callbacks")
        raise RecipeError([("pruning", f"{what}: {exc}" + ("; allowed here: one mapping" if many else ""))],
                          source="pruning") from None


def check_guard_metrics(recipe: Recipe) -> None:
    """Every ``accuracy_guard.metric`` is a key the run's evaluation returns (else it would fail only at the
    guard's first evaluation, after the dense phase)."""
    from prune_callbacks.recipe.evaluation import evaluation_keys

    keys = evaluation_keys(recipe)
    many = isinstance(recipe.pruning, list)
    problems = []
    for i, config in enumerate(recipe.pruning_configs):
        guard = getattr(config, "accuracy_guard", None)
        if guard is None or guard.metric in keys:
            continue
        name = guard.metric.removeprefix("eval_")
        hint = (f" (or add {name} to evaluation.metrics to have it measured)"
                if recipe.task == "sequence-classification" and name in METRICS[recipe.task] else "")
        path = f"pruning.{i}.accuracy_guard.metric" if many else "pruning.accuracy_guard.metric"
        problems.append((path, f"accuracy_guard.metric={guard.metric!r} is not among the metrics this run's "
                               f"evaluation returns; allowed: {', '.join(keys)}{hint}"))
    if problems:
        raise RecipeError(problems, source="pruning")


def check_resume_state(checkpoint) -> None:
    """The pruning state a resumed run starts from must read back (a damaged file is named, with the remedy)."""
    from prune_callbacks.integrations.trainer.checkpoint import read_state

    read_state(checkpoint / STATE_FILE)


def check_teacher(recipe: Recipe, model) -> None:
    """A teacher folder fits the student: same architecture, and what distillation compares (vocabulary, labels;
    depth and width with hidden_weight), read from its config.json without loading its weights."""
    config = recipe.distillation
    if config is None or config.self_teacher or not isinstance(config.teacher, str):
        return
    from types import SimpleNamespace

    from transformers import AutoConfig

    from prune_callbacks.controllers.distillation.teacher import check_compatible

    def problem(message: str) -> RecipeError:
        return RecipeError([("distillation.teacher", message)], source="distillation")

    try:
        teacher = AutoConfig.from_pretrained(config.teacher)
    except Exception as exc:  # noqa: BLE001 - any unreadable config is a setting to fix
        raise problem(f"teacher={config.teacher!r} has no readable model config.json: {exc}") from None
    student = getattr(model, "config", None)
    s_type, t_type = getattr(student, "model_type", None), getattr(teacher, "model_type", None)
    if s_type and t_type and s_type != t_type:
        raise problem(f"teacher={config.teacher!r} is a {t_type!r} model (its config.json), the student "
                      f"{recipe.model.name!r} is a {s_type!r} model; allowed: a teacher of the student's architecture "
                      f"({type(model).__name__} loads it), or teacher: self")
    try:
        check_compatible(model, SimpleNamespace(config=teacher), hidden=config.hidden_weight > 0,
                         name=repr(config.teacher))
    except ValueError as exc:  # DistillationConfigError
        raise problem(str(exc)) from None


def check_model(recipe: Recipe, model, tokenizer) -> list[str]:
    """What needs the loaded model: the sequence length it accepts, and the pruning targets; returns the
    Pruner's advice (`check_targets`)."""
    from prune_callbacks.recipe.models import max_positions

    limit = max_positions(model, tokenizer)
    if limit is not None and recipe.data.max_length > limit:
        raise RecipeError([("data.max_length", f"max_length={recipe.data.max_length} is longer than the model accepts; "
                                               f"allowed: <= {limit}")], source="data")
    advice = check_targets(recipe, model)
    check_teacher(recipe, model)
    return advice


EPOCH_RUN_STAND_IN = 10**6


def check_targets(recipe: Recipe, model) -> list[str]:
    """Build the Pruner(s) the run would build (include / exclude must match, targets must be prunable); returns
    its schedule advice (`Pruner.schedule_advice`: warnings that do not stop the run, e.g. blocks removed too late),
    which the run itself warns again."""
    import warnings

    from prune_callbacks.engine.pruner import Pruner

    max_steps = recipe.training.get("max_steps", -1)
    # epoch-based runs: the step count is known only once the Trainer has its dataloader; a stand-in lets
    # fractional start_step / end_step resolve for this dry build (it checks targets, not the schedule)
    total = max_steps if isinstance(max_steps, int) and max_steps > 0 else EPOCH_RUN_STAND_IN
    many = isinstance(recipe.pruning, list)
    try:
        with warnings.catch_warnings():  # its advice is returned, not warned twice
            warnings.simplefilter("ignore")
            pruner = Pruner(model, recipe.pruning if not many else list(recipe.pruning), total_steps=total)
    except (ValueError, TypeError, NotImplementedError) as exc:  # PruningConfigError is a ValueError
        what = f"the {len(recipe.pruning)} pruning configs do" if many else "the pruning config does"
        raise RecipeError([("pruning", f"{what} not fit the model {recipe.model.name!r}: {exc}")],
                          source="pruning") from None
    if recipe.output.slim:
        from prune_callbacks.recipe.slimming import check_pruner

        check_pruner(pruner)
    advice = pruner.schedule_advice()
    del pruner
    return advice
