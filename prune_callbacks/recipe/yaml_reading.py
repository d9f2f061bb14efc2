"""The recipe's YAML reading: the one reader of :mod:`prune_callbacks.integrations.yaml_files` (safe loading,
unique keys, YAML 1.2 booleans and numbers, a line map, syntax errors in words), its problems raised as
`RecipeError`."""

from __future__ import annotations

import os

from prune_callbacks.integrations.yaml_files import LocatedProblems, load_yaml_text, yaml_problem
from prune_callbacks.integrations.yaml_files import read_yaml as _read_yaml
from prune_callbacks.recipe.errors import RecipeError

__all__ = ["load_yaml_text", "read_yaml", "yaml_problem"]


def read_yaml(path: "str | os.PathLike") -> tuple[dict, dict]:
    """``(data, line map)`` of a recipe file; RecipeError for unreadable files and YAML syntax errors."""
    try:
        return _read_yaml(path)
    except LocatedProblems as exc:
        raise RecipeError(exc.problems, source=exc.source, lines=exc.lines) from None
