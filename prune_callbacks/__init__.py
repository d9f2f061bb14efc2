"""prune_callbacks: prune transformer models inside ordinary fine-tuning.

The folder tree is the architecture; each layer imports only the layers above it in this list
(``tests/test_layout.py`` fails on an upward import or a cycle):

* ``core/``: primitives that know no method: the validated configs (`PruningConfig`), the registry of
  named parts, which weights are targets, the architecture family table, counting and reports, the
  log-key schema, state files on disk, process helpers;
* ``methods/``: saliencies, schedules, exact selection, granularities (unstructured, N:M, structured
  units, low rank: a new one goes in ``methods/granularity/``), sharding, the step components;
* ``engine/``: the `Pruner` that composes them, and its state;
* ``export/``: what a pruned model becomes: slim models, low-rank factors, sparse checkpoints,
  semi-structured 2:4 (a new export format goes here, registered in ``export.EXPORTS``);
* ``controllers/``: the accuracy guard and distillation, which steer a run;
* ``integrations/``: the Hugging Face Trainer callbacks and the Accelerate hooks (a new framework
  adapter goes here);
* ``recipe/``, ``analysis/``, ``cli.py``: YAML recipes, the redundancy analysis, the command line;
  ``assets/``: the offline models and data they use.

``import prune_callbacks`` imports neither transformers nor accelerate: the adapters are exported
lazily. Import paths of the flat layout before this one keep working (``_moved.py``).
"""

from prune_callbacks import _moved
from prune_callbacks._lazy import lazy_exports

from prune_callbacks.core.config import L1Config, PruningConfig, PruningConfigError
from prune_callbacks.methods.granularity import Granularity
from prune_callbacks.engine.pruner import Pruner
from prune_callbacks.core.registry import register_granularity, register_saliency, register_schedule
from prune_callbacks.core.report import model_sparsity, sparsity_of_tensors
from prune_callbacks.methods.saliency import Saliency
from prune_callbacks.methods.schedule import Schedule, target_sparsity
from prune_callbacks.export.semi_structured import to_semi_structured
from prune_callbacks.methods.steps.base import StepComponent

__version__ = "0.1.0"

_LAZY = {
    "make_callbacks": "prune_callbacks.integrations.trainer",
    "GradualPruningCallback": "prune_callbacks.integrations.trainer",
    "L1RegularizationCallback": "prune_callbacks.integrations.trainer",
    "PermanentMaskCallback": "prune_callbacks.integrations.trainer",
    "AcceleratePruningHook": "prune_callbacks.integrations.accelerate.hook",
    "save_sparse": "prune_callbacks.export.sparse_io",
    "load_sparse": "prune_callbacks.export.sparse_io",
    "densify": "prune_callbacks.export.sparse_io",
    "SparseCheckpointError": "prune_callbacks.export.sparse_io",
    "DistillationConfig": "prune_callbacks.controllers.distillation",
    "DistillationCallback": "prune_callbacks.integrations.trainer.distillation",
    "AccelerateDistillationHook": "prune_callbacks.integrations.accelerate.distillation",
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
_moved.install()
