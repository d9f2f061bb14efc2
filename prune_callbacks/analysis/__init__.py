"""Redundancy analysis: where a model is redundant, before you choose how to compress it.

``analyze(model, batches, eval_batches)`` (pure torch) measures spectra, saliency mass, head / neuron
importance and duplicates, and block influence; :mod:`.report` writes analysis.json, ANALYSIS.md and
plots; :mod:`.suggest` turns the figures into a recipe. ``prune-callbacks analyze RECIPE.yaml`` runs
it all from a recipe (:mod:`.recipe_run`).
"""

from prune_callbacks.analysis.errors import AnalysisError
from prune_callbacks.analysis.run import analyze
from prune_callbacks.analysis.spectra import spectrum_stats

__all__ = ["AnalysisError", "analyze", "spectrum_stats"]
