"""The pruning state in Trainer checkpoints: writing it, recording where it is, finding it on resume.

* ``on_save`` writes ``pruning_state.safetensors`` (masks, saliency buffers,
  counters) into ``checkpoint-N/`` beside the (already masked) weights.
* `PruningStateRecord` (an ``ExportableState`` callback of every
  `make_callbacks` set) puts a small record into the checkpoint's
  ``trainer_state.json``: the absolute path of that state file and its step. The
  Trainer restores ``trainer_state.json`` from whatever folder
  ``train(resume_from_checkpoint=...)`` names, so at ``on_train_begin`` the record
  says where the state is -- also when the folder lives in another run's
  ``output_dir`` (the Trainer passes the folder itself to no callback).
* Resume looks, in order, at ``resume_from=``, ``args.resume_from_checkpoint``,
  the recorded path and ``output_dir/checkpoint-N``, taking the first state file
  written at the resumed step.
* No state found: if the record says a state was written, it was lost -> error.
  With no record, the checkpoint comes from a run without these callbacks (a
  dense run): pruning starts fresh at the resumed step, with a log line --
  unless the loaded model already has many exact zeros in the targeted weights
  (then it was pruned, and its state is missing -> error).

No transformers import here: only ``args`` / ``state`` attributes are read.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch

from prune_callbacks.core.state_io import STATE_FILE, load_state_file, save_state_file

logger = logging.getLogger(__name__)

RECORD_NAME = "PruningStateRecord"  # the key in TrainerState.stateful_callbacks (the record's class name)
RECORD_VERSION = 1
#: More exact zeros than this in a targeted weight means the model was pruned before.
PRUNED_ZERO_FRACTION = 0.01


def checkpoint_dir(args: Any, state: Any) -> str:
    """The folder ``Trainer._save_checkpoint`` writes at this step (no hyper-parameter search)."""
    return os.path.join(args.output_dir, f"checkpoint-{state.global_step}")


def record_for(args: Any, state: Any, writes_state: bool) -> dict:
    """The record of a checkpoint written now: where its pruning state file is (None: none written)."""
    path = os.path.abspath(os.path.join(checkpoint_dir(args, state), STATE_FILE)) if writes_state else None
    return {"version": RECORD_VERSION, "global_step": int(state.global_step), "state_file": path}


def exported_state(record: Optional[dict]) -> dict:
    """``ExportableState.state()`` form: no constructor args, the record as the one attribute."""
    return {"args": {}, "attributes": {"record": record}}


def restored_record(state: Any) -> Optional[dict]:
    """The record of the checkpoint the TrainerState was restored from (None: none there)."""
    stored = (getattr(state, "stateful_callbacks", None) or {}).get(RECORD_NAME)
    if isinstance(stored, list):
        stored = stored[-1] if stored else None
    if not isinstance(stored, dict):
        return None
    record = (stored.get("attributes") or {}).get("record")
    return record if isinstance(record, dict) else None


def ensure_record_slot(state: Any, current: dict) -> None:
    """Workaround: ``Trainer._save_checkpoint`` does ``state.stateful_callbacks[name]`` for every
    ``ExportableState`` callback and raises ``KeyError`` when the TrainerState was restored from a
    checkpoint written without that callback (a dense run's). Add the slot so the next save works."""
    slots = getattr(state, "stateful_callbacks", None)
    if isinstance(slots, dict) and RECORD_NAME not in slots:
        slots[RECORD_NAME] = current


def save_state(pruner: Any, args: Any, state: Any) -> Optional[str]:
    """Write the pruning state into this step's checkpoint folder (the process that saves only)."""
    if pruner is None or pruner.finalized or not args.should_save:
        return None
    folder = checkpoint_dir(args, state)
    if not os.path.isdir(folder):
        logger.warning("prune_callbacks: checkpoint folder %s not found; pruning state not saved", folder)
        return None
    payload = pruner.state_dict()
    payload.update(global_step=int(state.global_step), total_steps=int(state.max_steps))
    return str(save_state_file(payload, os.path.join(folder, STATE_FILE)))


def read_state(path: "str | os.PathLike", device="cpu") -> dict:
    """`load_state_file`, with a damaged file named and the remedy given (`PruningStateError`)."""
    from prune_callbacks.engine.state import PruningStateError

    try:
        return load_state_file(path, device=device)
    except (ValueError, KeyError, TypeError) as exc:  # truncated / not a pruning state / damaged metadata
        folder = os.path.dirname(os.path.abspath(path))
        detail = str(exc).removeprefix(f"{path} ").removeprefix("is ")
        raise PruningStateError(
            f"{path} is damaged ({detail}); the run cannot resume from {os.path.basename(folder)}. Delete the folder "
            f"{folder} to resume from the checkpoint before it (`prune-callbacks report {folder}` shows the same "
            "problem)") from None


def find_state(candidates, global_step: int, device) -> tuple[Optional[str], Optional[dict], list[str]]:
    """The first candidate (folder or state file) holding a state written at ``global_step``."""
    tried = []
    for candidate in dict.fromkeys(str(c) for c in candidates if isinstance(c, (str, os.PathLike))):
        path = candidate if candidate.endswith(".safetensors") else os.path.join(candidate, STATE_FILE)
        if not os.path.isfile(path):
            tried.append(f"{path} (missing)")
            continue
        saved = read_state(path, device=device)
        step = saved.get("global_step")
        if step is not None and int(step) != global_step:
            tried.append(f"{path} (written at step {step})")
            continue
        return path, saved, tried
    return None, None, tried


@torch.no_grad()
def looks_pruned(params) -> Optional[str]:
    """A line naming how many exact zeros the targeted weights hold, when that means "pruned before"."""
    zeros = [(int(p.numel() - torch.count_nonzero(p)), p.numel()) for p in params]
    heavy = sum(1 for z, n in zeros if n and z / n > PRUNED_ZERO_FRACTION)
    if not heavy:
        return None
    total_z, total_n = sum(z for z, _ in zeros), sum(n for _, n in zeros)
    return (f"{heavy} of {len(zeros)} targeted weights are more than {PRUNED_ZERO_FRACTION:.0%} exact zeros "
            f"({total_z / max(total_n, 1):.1%} overall)")
