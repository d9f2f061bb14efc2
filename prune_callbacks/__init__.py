"""prune_callbacks: prune transformer models inside ordinary fine-tuning.

The core is pure torch. Where each part lives (a new one goes next to its kind):

* ``config.py``: `PruningConfig` / `L1Config` (validated; names checked against ``registry.py``);
* ``saliency.py``: how weights are scored (taylor, platon, movement, magnitude; ``register_saliency``);
* ``schedule.py``: how sparsity rises over steps (cubic, linear, oneshot; ``register_schedule``);
* ``granularity/``: how masks are shaped and chosen (unstructured, N:M; ``register_granularity``);
* ``steps/``: what rides the optimizer step and in which order (pruning groups, L1; controllers);
* ``peft_support.py``: models carrying PEFT (LoRA) adapters are refused, with the reason and the remedy;
* ``pruner.py``: the `Pruner` that composes them; ``report.py``: the one sparsity report. The Trainer and Accelerate adapters and the checkpoint helpers are
exported lazily, so ``import prune_callbacks`` never imports transformers or
accelerate.
"""

from ._lazy import lazy_exports

from .config import L1Config, PruningConfig, PruningConfigError
from .granularity import Granularity
from .pruner import Pruner
from .registry import register_granularity, register_saliency, register_schedule
from .report import model_sparsity, sparsity_of_tensors
from .saliency import Saliency
from .schedule import Schedule, target_sparsity
from .semi_structured import to_semi_structured
from .steps.base import StepComponent

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
    "L1Config",
    "Pruner",
    "Granularity",
    "Saliency",
    "Schedule",
    "StepComponent",
    "register_granularity",
    "register_saliency",
    "register_schedule",
    "to_semi_structured",
    "model_sparsity",
    "sparsity_of_tensors",
    "target_sparsity",
    "__version__",
    *_LAZY,
]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
