"""The error types of the recipe layer: `RecipeError` (every problem as ``(yaml path, message)``, located in
the file) and `FinalSaveError` (the trained run could not be saved; the message says what was kept)."""

from __future__ import annotations

from prune_callbacks.integrations.yaml_files import LocatedProblems, Problem

__all__ = ["Problem", "RecipeError", "FinalSaveError"]


class RecipeError(LocatedProblems):
    """An invalid recipe; ``problems`` holds ``(yaml path, message)`` pairs (located in the file as
    ``file:line: yaml.path: message`` by `LocatedProblems`)."""


class FinalSaveError(RuntimeError):
    """The final save of a finished run failed (a full disk, a read-only folder); the message says what is kept."""
