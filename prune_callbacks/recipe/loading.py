"""Load a recipe: read it (:mod:`.yaml_reading`), apply command-line overrides, validate; write the resolved copy.

Every problem is reported as ``file:line: yaml.path: message`` with the bad
value and what is allowed; all problems are collected before anything heavy
(model, data) is loaded.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import yaml
from pydantic import ValidationError

from prune_callbacks.core.config import PruningConfig, PruningConfigError
from prune_callbacks.recipe.errors import Problem, RecipeError
from prune_callbacks.recipe.schema import PRUNING_TAGS, SECTIONS, Recipe, cross_check
from prune_callbacks.recipe.training_args import check_training
from prune_callbacks.recipe.yaml_reading import load_yaml_text, read_yaml


def parse_set(item: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", value read as in a recipe file)``."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError([("", f"--set {item!r}: expected dotted.key=value, e.g. pruning.final_sparsity=0.8")],
                          source="--set")
    try:
        value = load_yaml_text(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        problem = (getattr(exc, "problem", None) or str(exc)).strip()
        raise RecipeError([(key, f"value {raw!r} is not valid YAML: {problem}; quote it, e.g. --set '{key}=\"...\"'")],
                          source="--set") from None
    return key, value


def apply_overrides(data: dict, overrides: Iterable[tuple[str, Any]], lines: dict) -> dict:
    """Set each dotted key (creating sections as needed); marks each overridden path as coming from ``--set``."""
    for key, value in overrides:
        parts = key.split(".")
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise RecipeError([(where, f"--set {key}: {where} is {child!r}, not a section")], source="--set")
            node = child
        node[parts[-1]] = value
        for path in [p for p in lines if p == key or p.startswith(key + ".")]:
            del lines[path]
        lines[key] = "--set"
    return data


def validate_data(data: dict, source: str = "recipe", lines: Optional[dict] = None) -> Recipe:
    """Validate a recipe mapping; raises RecipeError listing every problem."""
    lines = lines or {}
    training, problems = check_training(data.get("training"))
    recipe = None
    try:
        recipe = Recipe.model_validate({**data, "training": {}})
    except ValidationError as exc:
        problems.extend(pydantic_problems(exc))
    if recipe is not None:
        problems.extend(cross_check(recipe))
        max_steps = training.get("max_steps", -1)
        if not problems and isinstance(max_steps, int) and max_steps > 0:
            many = isinstance(recipe.pruning, list)
            for i, config in enumerate(recipe.pruning_configs):
                try:
                    config.resolve(max_steps)
                except PruningConfigError as exc:  # its problems as data: (field, message)
                    loc = ["pruning", str(i)] if many else ["pruning"]
                    if exc.problems:
                        problems.extend((".".join([*loc, *str(field).split(".")]) if field not in ("", "<root>")
                                         else ".".join(loc), f"{message} (training.max_steps={max_steps})")
                                        for field, message in exc.problems)
                    else:
                        problems.extend(_section_problems(loc, f"{exc} (training.max_steps={max_steps})"))
    if problems:
        raise RecipeError(problems, source=source, lines=lines)
    return recipe.model_copy(update={"training": training})


def load_recipe(path: "str | os.PathLike", sets: Sequence[str] = (), *, output_dir: Optional[str] = None,
                max_steps: Optional[int] = None) -> Recipe:
    """Read, override (``--set``, then ``--output-dir`` / ``--max-steps``), validate; fills output.dir's default."""
    data, lines = read_yaml(path)
    overrides = [parse_set(item) for item in sets]
    if output_dir is not None:
        overrides.append(("output.dir", str(output_dir)))
    if max_steps is not None:
        overrides.append(("training.max_steps", max_steps))
    apply_overrides(data, overrides, lines)
    recipe = validate_data(data, source=str(path), lines=lines)
    recipe._origin = (str(path), dict(lines))
    if recipe.output.dir is None:
        recipe.output.dir = str(Path("runs") / Path(path).stem)
    return recipe


def recipe_to_yaml(recipe: Recipe) -> str:
    """The fully resolved recipe (every default spelled out); it validates back to an equal Recipe."""
    header = "# Resolved recipe written by prune-callbacks: every default spelled out, overrides applied.\n"
    data = recipe.model_dump(mode="json")
    configs = [_applicable_dump(c) for c in recipe.pruning_configs]
    data["pruning"] = configs if isinstance(recipe.pruning, list) else configs[0]
    return header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _applicable_dump(config: PruningConfig) -> dict:
    """Every field of ``config`` except defaults that do not apply to its method (writing those out would
    make the copy invalid: a setting that does not apply is an error when it is set)."""
    data = config.model_dump(mode="json")
    for _ in range(len(data)):
        try:
            PruningConfig(**data)
            return data
        except PruningConfigError as exc:
            drop = {str(field).split(".")[0] for field, _ in exc.problems} - config.model_fields_set
            if not drop & set(data):
                break
            data = {k: v for k, v in data.items() if k not in drop}
    return config.model_dump(mode="json", exclude_unset=True)


# ---------------------------------------------------------------- errors
def pydantic_problems(exc: ValidationError) -> list[Problem]:
    """pydantic errors -> ``(yaml path, message)``, naming the bad value and what is allowed."""
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        if loc[:1] == ["pruning"] and len(loc) > 1 and loc[1] in PRUNING_TAGS:
            loc = [loc[0], *loc[2:]]  # the union's tag (one config / a list) is no part of the yaml path
        kind, value = err["type"], err.get("input")
        message = err["msg"].removeprefix("Value error, ")
        section = _section(loc[:-1])
        if kind == "extra_forbidden":
            allowed = sorted(section.model_fields) if section else []
            close = difflib.get_close_matches(loc[-1], allowed, n=1, cutoff=0.6)
            message = f"unknown key {loc[-1]!r}" + (f"; did you mean {close[0]!r}?" if close else "")
            message += f" (allowed keys: {', '.join(allowed)})" if allowed else ""
        elif kind == "missing":
            field = section.model_fields.get(loc[-1]) if section else None
            message = "required key is missing" + (f"; allowed: {field.description}" if field and field.description else "")
            if loc == ["task"]:
                message = "required key is missing; allowed: sequence-classification, causal-lm"
        elif kind == "value_error" and getattr((err.get("ctx") or {}).get("error"), "problems", None):
            # a PruningConfigError raised by the nested config carries its problems as (field, message) data
            for field, text in err["ctx"]["error"].problems:
                path = loc if field in ("", "<root>") else [*loc, *str(field).split(".")]
                problems.append((".".join(path), text))
            continue
        elif kind in ("value_error", "assertion_error"):
            problems.extend(_section_problems(loc, message))
            continue
        elif kind in ("model_type", "dict_type", "model_attributes_type"):
            message = f"must be a mapping (got {value!r})"
            if loc == ["pruning"]:
                message = f"must be a mapping (one PruningConfig) or a list of mappings (got {value!r})"
        else:
            message = f"{message} (got {value!r})"
        problems.append((".".join(loc), message))
    return problems


def _section(loc: list[str]):
    """The schema class of a yaml path (list indices skipped: ``pruning.1`` is a PruningConfig)."""
    return SECTIONS.get(".".join(p for p in loc if not p.isdigit()))


def _section_problems(loc: list[str], message: str) -> list[Problem]:
    """A section-level check names the field it is about first (``end_step=0.1 is before ...``):
    point the path at that field; one problem per line of a whole-config check's message (`PruningConfig` lists
    each offender on its own line), and per ``; ``-joined part when every part names a field."""
    section = _section(loc)
    if section is None:
        return [(".".join(loc), message)]
    if "\n" in message:
        return [p for line in message.split("\n") for p in _section_problems(loc, line)]

    def head(part: str) -> str:
        return part.split("=", 1)[0].split(" ", 1)[0]

    parts = message.split("; ")
    if len(parts) > 1 and all(head(p) in section.model_fields for p in parts):
        return [(".".join([*loc, head(p)]), p) for p in parts]
    if head(message) in section.model_fields:
        return [(".".join([*loc, head(message)]), message)]
    return [(".".join(loc), message)]
