"""Import paths of the flat layout before the package was layered (round 2), kept working.

``from prune_callbacks.sparse_io import save_sparse`` still imports: a finder on ``sys.meta_path`` maps the
old module name (the longest matching prefix in `MOVED`) to its new home and hands back that module. New code
uses the new paths; this table is the one place that knows the old ones.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    'prune_callbacks.config': 'prune_callbacks.core.config',
    'prune_callbacks.config_errors': 'prune_callbacks.core.config_errors',
    'prune_callbacks.distillation': 'prune_callbacks.controllers.distillation',
    'prune_callbacks.distributed': 'prune_callbacks.core.distributed',
    'prune_callbacks.figures': 'prune_callbacks.core.figures',
    'prune_callbacks.granularity': 'prune_callbacks.methods.granularity',
    'prune_callbacks.guard': 'prune_callbacks.controllers.guard',
    'prune_callbacks.guard.config': 'prune_callbacks.core.guard_config',
    'prune_callbacks.integrations.accelerate_distillation': 'prune_callbacks.integrations.accelerate.distillation',
    'prune_callbacks.integrations.accelerate_guard': 'prune_callbacks.integrations.accelerate.guard',
    'prune_callbacks.integrations.accelerate_support': 'prune_callbacks.integrations.accelerate.support',
    'prune_callbacks.integrations.distillation_callback': 'prune_callbacks.integrations.trainer.distillation',
    'prune_callbacks.integrations.trainer_dense': 'prune_callbacks.integrations.trainer.dense',
    'prune_callbacks.low_rank': 'prune_callbacks.export.low_rank',
    'prune_callbacks.optimizer_unwrap': 'prune_callbacks.core.optimizer_unwrap',
    'prune_callbacks.peft_support': 'prune_callbacks.core.peft_support',
    'prune_callbacks.pruner': 'prune_callbacks.engine.pruner',
    'prune_callbacks.pruner_state': 'prune_callbacks.engine.state',
    'prune_callbacks.registry': 'prune_callbacks.core.registry',
    'prune_callbacks.regularization': 'prune_callbacks.methods.regularization',
    'prune_callbacks.report': 'prune_callbacks.core.report',
    'prune_callbacks.resolution': 'prune_callbacks.core.resolution',
    'prune_callbacks.saliency': 'prune_callbacks.methods.saliency',
    'prune_callbacks.schedule': 'prune_callbacks.methods.schedule',
    'prune_callbacks.selection': 'prune_callbacks.methods.selection',
    'prune_callbacks.selection_radix': 'prune_callbacks.methods.selection_radix',
    'prune_callbacks.semi_structured': 'prune_callbacks.export.semi_structured',
    'prune_callbacks.sharded_state': 'prune_callbacks.engine.sharded_state',
    'prune_callbacks.sharding': 'prune_callbacks.methods.sharding',
    'prune_callbacks.sparse_io': 'prune_callbacks.export.sparse_io',
    'prune_callbacks.state_compat': 'prune_callbacks.engine.state',
    'prune_callbacks.state_io': 'prune_callbacks.core.state_io',
    'prune_callbacks.steps': 'prune_callbacks.methods.steps',
    'prune_callbacks.structured': 'prune_callbacks.export',
    'prune_callbacks.structured.description': 'prune_callbacks.core.unit_description',
    'prune_callbacks.structured.families': 'prune_callbacks.core.families',
    'prune_callbacks.structured.merge_config': 'prune_callbacks.core.merge_config',
    'prune_callbacks.structured.pruned': 'prune_callbacks.export.slim_pruned',
    'prune_callbacks.structured.slim': 'prune_callbacks.export.slim',
    'prune_callbacks.targets': 'prune_callbacks.core.targets',
}


_LONGEST_FIRST = sorted(MOVED, key=len, reverse=True)


def new_name(name: str) -> str | None:
    """The current module name for an old one, or None when ``name`` did not move."""
    if not name.startswith("prune_callbacks."):
        return None
    for old in _LONGEST_FIRST:
        if name == old or name.startswith(old + "."):
            return MOVED[old] + name[len(old):]
    return None


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if new_name(fullname) is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        # the import system returns what sys.modules holds under the old name once this returns
        sys.modules[module.__name__] = importlib.import_module(new_name(module.__name__))


def install() -> None:
    """First on ``sys.meta_path``: an old name must not be found as a stale file elsewhere on the path."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
