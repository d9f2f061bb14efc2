"""Knowledge distillation from a dense teacher while the student is pruned (pure torch).

* :mod:`.config`: `DistillationConfig` (validated, ``extra="forbid"``).
* :mod:`.losses`: logit KL with T^2 scaling, per-block normalised hidden-state MSE.
* :mod:`.teacher`: the frozen teacher (snapshot, path / module, checks, exact save / restore).
* :mod:`.distiller`: `Distiller`, which puts the distillation term into the student's
  ``outputs.loss`` by patching its ``forward`` on the instance.

The adapters: ``make_callbacks(config, distillation=...)`` (HF Trainer,
`prune_callbacks.integrations.trainer.distillation`) and
`prune_callbacks.integrations.accelerate.distillation.AccelerateDistillationHook`.
"""

from prune_callbacks.controllers.distillation.config import DistillationConfig, DistillationConfigError, make_distillation_config
from prune_callbacks.controllers.distillation.distiller import Distiller
from prune_callbacks.controllers.distillation.losses import hidden_loss, kd_loss, token_mask
from prune_callbacks.controllers.distillation.teacher import TEACHER_FILE, module_bytes

__all__ = [
    "DistillationConfig",
    "DistillationConfigError",
    "make_distillation_config",
    "Distiller",
    "kd_loss",
    "hidden_loss",
    "token_mask",
    "TEACHER_FILE",
    "module_bytes",
]
