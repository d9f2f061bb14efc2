"""Recipes: a whole fine-tune-while-pruning run described in one YAML file.

`load_recipe` reads, overrides and validates a recipe (nothing heavy is
loaded); `run_recipe` (in :mod:`.workflow`) runs it. The ``prune-callbacks``
command line (:mod:`prune_callbacks.cli`) is a thin layer over both.
"""

from prune_callbacks.recipe.errors import RecipeError
from prune_callbacks.recipe.loading import load_recipe, recipe_to_yaml, validate_data
from prune_callbacks.recipe.schema import Recipe

__all__ = ["Recipe", "RecipeError", "load_recipe", "recipe_to_yaml", "validate_data", "run_recipe"]


def run_recipe(recipe, recipe_path=None):
    """Run a validated recipe (see :func:`prune_callbacks.recipe.workflow.run_recipe`)."""
    from prune_callbacks.recipe.workflow import run_recipe as _run

    return _run(recipe, recipe_path=recipe_path)
