"""prune_callbacks: prune transformer models inside ordinary fine-tuning.

The core (config, targets, saliency, schedule, selection, pruner, report) is
pure torch; the Trainer and Accelerate adapters import their frameworks lazily.
"""

from .config import PruningConfig, PruningConfigError
from .pruner import Pruner
from .report import model_sparsity, sparsity_of_tensors
from .schedule import target_sparsity

__version__ = "0.1.0"

__all__ = [
    "PruningConfig",
    "PruningConfigError",
    "Pruner",
    "model_sparsity",
    "sparsity_of_tensors",
    "target_sparsity",
    "__version__",
]
