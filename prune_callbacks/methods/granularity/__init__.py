"""Granularities: how masks are shaped and chosen (see :mod:`.base`). Importing registers the built-ins."""

from prune_callbacks.methods.granularity.base import Granularity
from prune_callbacks.methods.granularity.nm import NM
from prune_callbacks.methods.granularity.nm_srste import NMSRSTE
from prune_callbacks.methods.granularity.unstructured import Unstructured
from prune_callbacks.methods.granularity.structured import AttentionHeads, Blocks, FFNNeurons
from prune_callbacks.methods.granularity.low_rank import LowRank

__all__ = ["Granularity", "NM", "NMSRSTE", "Unstructured", "FFNNeurons", "AttentionHeads", "Blocks", "LowRank"]
