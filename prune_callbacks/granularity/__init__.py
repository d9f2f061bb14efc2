"""Granularities: how masks are shaped and chosen (see :mod:`.base`). Importing registers the built-ins."""

from .base import Granularity
from .nm import NM
from .unstructured import Unstructured
from .structured import AttentionHeads, Blocks, FFNNeurons
from .low_rank import LowRank

__all__ = ["Granularity", "NM", "Unstructured", "FFNNeurons", "AttentionHeads", "Blocks", "LowRank"]
