"""The one YAML reader of config files, recipes and ``--set`` values, and `LocatedProblems`, the error that
names each problem as ``file:line: yaml.path: message``.

Used by :mod:`prune_callbacks.integrations.configs` (a YAML file given to an adapter) and by the recipe
layer (:mod:`prune_callbacks.recipe.yaml_reading`, whose `RecipeError` is a `LocatedProblems`), so the
adapters never import the recipe layer above them.

Safe loading only (nothing is ever evaluated), duplicate keys refused (PyYAML would silently keep the
last one), booleans as in YAML 1.2 (only ``true`` / ``false``: ``save_strategy: no`` stays the word
``"no"``), numbers without YAML 1.1's base 60 (``2:4`` stays the string ``"2:4"``), a line map (yaml
path -> line of its key) for located errors, and syntax errors in words with ``file:line:column`` and
a caret.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

Problem = tuple[str, str]  # (yaml path, message)


class LocatedProblems(ValueError):
    """Problems of a YAML file as data: ``problems`` holds ``(yaml path, message)`` pairs, ``lines`` maps a yaml
    path to its line (or to a text such as ``"--set"``); the message has one ``where: path: message`` line each."""

    def __init__(self, problems: Sequence[Problem], source: str = "recipe", lines: Optional[dict] = None):
        self.problems = list(problems)
        self.source = source
        self.lines = lines or {}
        super().__init__("\n".join(self.format_lines()))

    def located(self, source: str, lines: Optional[dict]) -> "LocatedProblems":
        """The same problems, located in the file (for problems found after validation)."""
        return type(self)(self.problems, source=source, lines={**(lines or {}), **self.lines})

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
    YAML 1.1's base-60 numbers are not read either: ``granularity: 2:4`` is the string ``"2:4"`` (not 124).
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


_BOOL, _INT, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_BOOL, _INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_RecipeLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|false)$", re.IGNORECASE), list("tTfF"))
# YAML 1.1's numbers without its base-60 forms: ``2:4`` (an N:M granularity) and ``1:30`` stay strings, as in
# YAML 1.2, instead of becoming the integers 124 and 90. Everything else reads as PyYAML reads it.
_RecipeLoader.add_implicit_resolver(_INT, re.compile(r"""^(?:[-+]?0b[0-1_]+
                    |[-+]?0[0-7_]+
                    |[-+]?(?:0|[1-9][0-9_]*)
                    |[-+]?0x[0-9a-fA-F_]+)$""", re.X), list("-+0123456789"))
_RecipeLoader.add_implicit_resolver(_FLOAT, re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
                    |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


def _load(text: str) -> tuple[Any, Optional[yaml.Node]]:
    """``(data, node)`` from one parse: the node tree gives the line map, its construction the data."""
    loader = _RecipeLoader(text)
    try:
        node = loader.get_single_node()
        return (loader.construct_document(node) if node is not None else None), node
    finally:
        loader.dispose()


def load_yaml_text(text: str) -> Any:
    """The one YAML reading rule for recipes and ``--set`` values (safe, unique keys, YAML 1.2 booleans)."""
    return _load(text)[0]


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
        raise LocatedProblems([("", f"no such recipe file {str(path)!r}")], source=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LocatedProblems([("", f"cannot read the recipe: {exc}")], source=str(path)) from None
    try:
        data, node = _load(text)
        lines = _line_map(node)
    except yaml.YAMLError as exc:
        where, message = yaml_problem(exc, str(path))
        raise LocatedProblems([("", message)], source=where) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LocatedProblems([("", f"a recipe must be a mapping of sections (got {type(data).__name__})")], source=str(path))
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
