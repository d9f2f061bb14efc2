"""Where the figures go: the logs dict, ``state.log_history``, and the reporters' order.

The Trainer's ``log(logs)`` appends a copy of ``logs`` (plus ``step``) to
``state.log_history``, then calls every callback's ``on_log(logs)`` in order:
``DefaultFlowCallback``, the reporting integrations (TensorBoard, W&B, the
printer, ...), then user callbacks. So:

* figures are added to the ``logs`` dict of training-step logs (the ones with a
  ``loss`` key): callbacks after ours and reporters see them;
* never to the metrics dicts that ``trainer.train()`` / ``trainer.evaluate()``
  return (the Trainer logs those very dicts: their keys end in ``_runtime``), so
  returned metrics, ``train_results.json`` / ``all_results.json`` and the
  hyper-parameter-search objective stay free of ``sparsity/*``;
* every figure also goes into the ``log_history`` entry just appended
  (:func:`place_in_log_history`, the one workaround: transformers has no API to
  add to an entry) -- or, when that entry holds an evaluation's metrics, into an
  entry of its own at the same step, so that the model card
  (``Trainer.create_model_card``) never lists ``sparsity/*`` or ``pruning/*`` as
  results on the evaluation set;
* `put_before_reporters` moves our callbacks right after ``DefaultFlowCallback``
  with the Trainer's own ``pop_callback`` / ``add_callback``, so reporters run
  after them (``callbacks.bind(trainer)`` does it).
"""

from __future__ import annotations

from typing import Any


def is_returned_metrics(logs: dict) -> bool:
    """Whether ``logs`` is a metrics dict a Trainer method returns (train end, evaluate): those carry
    ``<split>_runtime``; a training-step log carries ``loss`` (and a ``train_runtime`` only when
    ``include_num_input_tokens_seen`` is on)."""
    if "loss" in logs:
        return False
    return any(isinstance(k, str) and k.endswith("_runtime") for k in logs)


def place_in_log_history(state: Any, figures: dict) -> bool:
    """Add ``figures`` to the ``log_history`` entry ``Trainer.log`` appended for this ``on_log``.

    Relies on (transformers 5.x ``Trainer.log``): the entry is ``{**logs, "step": global_step}``,
    appended *before* ``on_log`` runs, so it is the last one and its ``step`` is the current global
    step. ``tests/test_trainer_logs.py`` fails if that changes. Returns whether it was placed.
    """
    if not figures or not state.log_history:
        return False
    entry = state.log_history[-1]
    if entry.get("step") != state.global_step:
        return False
    if is_returned_metrics(entry) and any(isinstance(k, str) and k.startswith("eval_") for k in entry):
        # an evaluation's entry: the model card (transformers.modelcard.parse_log_history) reads every key of an
        # entry with ``eval_loss`` as a result on the evaluation set, so the figures go into an entry of their
        # own right after it (same step), never among the metrics
        state.log_history.append({**figures, "step": state.global_step})
        return True
    entry.update(figures)
    return True


def add_figures(state: Any, logs: dict, figures: dict) -> None:
    """Figures into ``logs`` (unless it is a returned metrics dict) and into its ``log_history`` entry."""
    if not figures:
        return
    if not is_returned_metrics(logs):
        logs.update(figures)
    place_in_log_history(state, figures)


def put_before_reporters(trainer: Any, ours: type) -> None:
    """Order the handler's callbacks: those up to ``DefaultFlowCallback``, the callbacks of type
    ``ours``, then the rest (reporting integrations, printer, user callbacks), each group in its order."""
    from transformers.trainer_callback import DefaultFlowCallback

    current = list(trainer.callback_handler.callbacks)
    mine = [cb for cb in current if isinstance(cb, ours)]
    rest = [cb for cb in current if not isinstance(cb, ours)]
    at = 1 + max((i for i, cb in enumerate(rest) if isinstance(cb, DefaultFlowCallback)), default=-1)
    order = rest[:at] + mine + rest[at:]
    if order == current:
        return
    moved = order[at:]
    for cb in moved:
        trainer.pop_callback(cb)
    for cb in moved:
        trainer.add_callback(cb)
