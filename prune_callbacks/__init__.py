"""prune_callbacks: prune transformer models inside ordinary fine-tuning.

The core (config, targets, saliency, schedule, selection, pruner, report) is
pure torch. The Trainer and Accelerate adapters and the checkpoint helpers are
exported lazily, so ``import prune_callbacks`` never imports transformers or
accelerate.
"""

from importlib import import_module

from .config import PruningConfig, PruningConfigError
from .pruner import Pruner
from .report import model_sparsity, sparsity_of_tensors
from .schedule import target_sparsity

__version__ = "0.1.0"

_LAZY = {
    "make_callbacks": ".integrations.trainer",
    "GradualPruningCallback": ".integrations.trainer",
    "L1RegularizationCallback": ".integrations.trainer",
    "PermanentMaskCallback": ".integrations.trainer",
    "AcceleratePruningHook": ".integrations.accelerate",
    "save_sparse": ".sparse_io",
    "load_sparse": ".sparse_io",
    "densify": ".sparse_io",
    "SparseCheckpointError": ".sparse_io",
    "DistillationConfig": ".distillation",
    "DistillationCallback": ".integrations.distillation_callback",
    "AccelerateDistillationHook": ".integrations.accelerate_distillation",
}

__all__ = [
    "PruningConfig",
    "PruningConfigError",
    "Pruner",
    "model_sparsity",
    "sparsity_of_tensors",
    "target_sparsity",
    "__version__",
    *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
