"""Names that moved to their own modules stay importable from where they were (one object, not a copy)."""

from __future__ import annotations

import importlib

import pytest

MOVED = [  # (old module, name, new module)
    ("prune_callbacks.core.config", "PruningConfigError", "prune_callbacks.core.config_errors"),
    ("prune_callbacks.core.config", "format_validation_error", "prune_callbacks.core.config_errors"),
    ("prune_callbacks.core.config", "validation_problems", "prune_callbacks.core.config_errors"),
    ("prune_callbacks.core.config", "_Validated", "prune_callbacks.core.config_errors"),
    ("prune_callbacks.core.config", "ResolvedSchedule", "prune_callbacks.core.resolution"),
    ("prune_callbacks.core.config", "MIN_MASK_UPDATES", "prune_callbacks.core.resolution"),
    ("prune_callbacks.engine.pruner", "STATE_VERSION", "prune_callbacks.engine.state"),
    ("prune_callbacks.engine.pruner", "_torch_optimizer", "prune_callbacks.core.optimizer_unwrap"),
    ("prune_callbacks.integrations.trainer.callbacks", "PruningCallbacks", "prune_callbacks.integrations.trainer.binding"),
    ("prune_callbacks.integrations.trainer.callbacks", "_TrainerPruningCallback",
     "prune_callbacks.integrations.trainer.binding"),
    ("prune_callbacks.integrations.trainer", "PruningCallbacks", "prune_callbacks.integrations.trainer.binding"),
]


@pytest.mark.parametrize("old, name, new", MOVED, ids=[f"{o}.{n}" for o, n, _ in MOVED])
def test_moved_name_is_reexported(old, name, new):
    if "integrations" in old:
        pytest.importorskip("transformers")
    new_name = {"_torch_optimizer": "torch_optimizer"}.get(name, name)
    assert getattr(importlib.import_module(old), name) is getattr(importlib.import_module(new), new_name)


def test_unknown_key_errors_still_list_the_allowed_keys():
    from prune_callbacks.core.config import L1Config, PruningConfig, PruningConfigError

    for model, key in ((PruningConfig, "final_sparsity"), (L1Config, "l1_lambda")):
        with pytest.raises(PruningConfigError, match=f"unknown key 'bogus'; allowed keys: .*{key}"):
            model(bogus=1, **({"l1_lambda": 1.0} if model is L1Config else {}))
