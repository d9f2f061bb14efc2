"""Read a recipe file, apply command-line overrides, validate, and write the resolved copy.

Every problem is reported as ``file:line: yaml.path: message`` with the bad
value and what is allowed; all problems are collected before anything heavy
(model, data) is loaded. YAML is read with ``yaml.safe_load`` semantics only:
nothing in a recipe is ever evaluated. Duplicate keys are an error (PyYAML
would silently keep the last one), and only ``true`` / ``false`` are booleans
(``save_strategy: no`` stays the word ``"no"``).
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import yaml
from pydantic import ValidationError

from ..config import PruningConfig, PruningConfigError
from .schema import PRUNING_TAGS, SECTIONS, Recipe, cross_check
from .training_args import check_training

Problem = tuple[str, str]  # (yaml path, message)


class RecipeError(ValueError):
    """An invalid recipe; ``problems`` holds ``(yaml path, message)`` pairs."""

    def __init__(self, problems: Sequence[Problem], source: str = "recipe", lines: Optional[dict] = None):
        self.problems = list(problems)
        self.source = source
        self.lines = lines or {}
        super().__init__("\n".join(self.format_lines()))

    def located(self, source: str, lines: Optional[dict]) -> "RecipeError":
        """The same problems, located in the recipe file (for problems found after validation)."""
        return RecipeError(self.problems, source=source, lines={**(lines or {}), **self.lines})

    def format_lines(self) -> list[str]:
        out = []
        for path, message in self.problems:
            where = self._where(path)
            out.append(f"{where}: {path}: {message}" if path else f"{where}: {message}")
        return out

    def _where(self, path: str) -> str:
        parts = path.split(".") if path else []
        while parts:  # the nearest enclosing key that has a known origin
            origin = self.lines.get(".".join(parts))
            if origin is not None:
                return origin if isinstance(origin, str) else f"{self.source}:{origin}"
            parts.pop()
        return self.source


class _RecipeLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses duplicate mapping keys and reads booleans as YAML 1.2 does.

    PyYAML follows YAML 1.1, where ``no`` / ``yes`` / ``on`` / ``off`` are booleans: ``save_strategy: no``
    would reach TrainingArguments as ``False``. Here only ``true`` / ``false`` (any case) are booleans; a bool
    field still accepts ``yes`` / ``no`` (pydantic converts the string), a string field gets the word.
    """

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.MarkedYAMLError(
                    "while reading a mapping", node.start_mark,
                    f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_BOOL = "tag:yaml.org,2002:bool"
_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_RecipeLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|false)$", re.IGNORECASE), list("tTfF"))


def load_yaml_text(text: str) -> Any:
    """The one YAML reading rule for recipes and ``--set`` values (safe, unique keys, YAML 1.2 booleans)."""
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass


def _line_map(node, prefix: str = "", out: Optional[dict] = None) -> dict:
    """yaml path -> 1-based line of its key."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            out[path] = key_node.start_mark.line + 1
            _line_map(value_node, path, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[f"{prefix}.{i}"] = item.start_mark.line + 1
            _line_map(item, f"{prefix}.{i}", out)
    return out


def read_yaml(path: "str | os.PathLike") -> tuple[dict, dict]:
    """``(data, line map)`` of a recipe file; RecipeError for unreadable files and YAML syntax errors."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError([("", f"no such recipe file {str(path)!r}")], source=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError([("", f"cannot read the recipe: {exc}")], source=str(path)) from None
    try:
        data = load_yaml_text(text)
        lines = _line_map(yaml.compose(text, Loader=_RecipeLoader))
    except yaml.YAMLError as exc:
        where, message = yaml_problem(exc, str(path))
        raise RecipeError([("", message)], source=where) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError([("", f"a recipe must be a mapping of sections (got {type(data).__name__})")], source=str(path))
    return data, lines


# PyYAML's problem text -> what it usually means in a hand-written recipe
_YAML_HINTS = (
    ("mapping values are not allowed", "a second ':' on one line; quote a value that contains ': ', "
                                       "or put the nested key on its own, indented line"),
    ("found character '\\t'", "a tab character; indent with spaces only"),
    ("could not find expected ':'", "a line that is neither 'key: value' nor a list item '- ...'"),
    ("did not find expected key", "an indentation that does not line up with the keys above it"),
    ("did not find expected '-' indicator", "a list item indented differently from the items above it"),
    ("found unexpected end of stream", "an unclosed quote or bracket"),
    ("found undefined alias", "an *alias with no matching &anchor"),
    ("found duplicate anchor", "the same &anchor defined twice"),
    ("duplicate key", "the same key twice in one section; keep one"),
    ("expected <block end>", "an indentation that does not line up with the keys above it"),
)


def yaml_problem(exc: "yaml.YAMLError", source: str) -> tuple[str, str]:
    """``(file:line:column, message in words)`` for a PyYAML error."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
    problem = (getattr(exc, "problem", None) or str(exc)).strip()
    hint = next((h for key, h in _YAML_HINTS if key in problem), None)
    message = f"not valid YAML: {problem}"
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and context_mark is not None and mark is not None and context_mark.line != mark.line:
        message += f" ({context} started at line {context_mark.line + 1})"
    if mark is not None and getattr(mark, "buffer", None):
        line = mark.buffer.split("\n")[mark.line] if mark.line < mark.buffer.count("\n") + 1 else ""
        line = line.replace("\0", "").rstrip()
        if line.strip():
            message += f"\n    {line}\n    {' ' * mark.column}^"
    if hint:
        message += f"\n    likely cause: {hint}"
    return where, message


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
                except PruningConfigError as exc:
                    loc = ["pruning", str(i)] if many else ["pruning"]
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
    point the path at that field, one problem per ``; ``-joined part when every part does so."""
    section = _section(loc)
    if section is None:
        return [(".".join(loc), message)]

    def head(part: str) -> str:
        return part.split("=", 1)[0].split(" ", 1)[0]

    parts = message.split("; ")
    if len(parts) > 1 and all(head(p) in section.model_fields for p in parts):
        return [(".".join([*loc, head(p)]), p) for p in parts]
    if head(message) in section.model_fields:
        return [(".".join([*loc, head(message)]), message)]
    return [(".".join(loc), message)]
