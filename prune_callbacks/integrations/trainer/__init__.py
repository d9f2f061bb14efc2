"""Gradual pruning inside a stock ``transformers.Trainer``: callbacks only.

::

    from prune_callbacks import PruningConfig, make_callbacks
    callbacks = make_callbacks(PruningConfig(final_sparsity=0.9))
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=callbacks)
    callbacks.bind(trainer)      # reporters see the figures, loss scaling checked, dense baseline possible
    trainer.train()              # prunes while it fine-tunes; masks permanent at the end
    trainer.save_model(out)      # plain from_pretrained loads it, zeros included

The package, one module per responsibility:

* :mod:`.callbacks` -- the ``TrainerCallback`` classes and `make_callbacks`: they
  only translate Trainer events into engine calls;
* :mod:`.engine` -- `TrainerPruningEngine`: one core `Pruner`'s life across
  ``train()`` calls (build at train begin, attach, finalize, best-model reloads);
* :mod:`.checkpoint` -- the pruning state in ``checkpoint-N/``, the record of
  where it is (kept in ``trainer_state.json``), resume and dense checkpoints;
* :mod:`.logs` -- where figures go (logs, ``log_history``, reporters' order),
  and the one workaround for ``log_history`` that transformers has no API for;
* :mod:`.dense` -- the dense baseline (``dense_*`` metrics);
* :mod:`.loss_scaling` -- the ``model_accepts_loss_kwargs`` check;
* :mod:`prune_callbacks.integrations.configs` (shared with the Accelerate hook) --
  configs from objects, dicts, lists and YAML files (through the recipe reader
  that ``prune-callbacks validate`` uses).

Names are imported lazily: ``import prune_callbacks.integrations.trainer.dense``
does not import transformers. Log keys: :mod:`prune_callbacks.core.figures`.
"""

from prune_callbacks._lazy import lazy_exports

_LAZY = {
    "make_callbacks": "prune_callbacks.integrations.trainer.callbacks",
    "PruningCallbacks": "prune_callbacks.integrations.trainer.callbacks",
    "GradualPruningCallback": "prune_callbacks.integrations.trainer.callbacks",
    "L1RegularizationCallback": "prune_callbacks.integrations.trainer.callbacks",
    "PermanentMaskCallback": "prune_callbacks.integrations.trainer.callbacks",
    "PruningStateRecord": "prune_callbacks.integrations.trainer.callbacks",
    "TrainerPruningEngine": "prune_callbacks.integrations.trainer.engine",
    "evaluate_dense": "prune_callbacks.integrations.trainer.dense",
}

__all__ = list(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
