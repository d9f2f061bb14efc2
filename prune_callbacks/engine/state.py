"""The pruning state of a `~prune_callbacks.engine.pruner.Pruner` in memory: its layout, taken and restored.

``Pruner.state_dict()`` / ``Pruner.load_state_dict()`` delegate here. The layout (version
`STATE_VERSION`): the first group's masks and saliency buffers are keyed by target name (the
original single-config layout), further groups' by ``group<i>/<name>`` (`group_key`); per-group
counters and schedules are in ``groups``. :mod:`.state_io` writes this dict to disk and reads it
back; `check_resumable` decides whether a saved one can be resumed by a given pruner (refuse what
cannot, warn what changed).
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prune_callbacks.engine.pruner import Pruner
    from prune_callbacks.methods.steps.pruning import PruningGroup

logger = logging.getLogger("prune_callbacks.engine.pruner")

STATE_VERSION = 1
_OTHER_GROUP = re.compile(r"group\d+/")


def group_key(index: int, name: str) -> str:
    """State-dict key of a group's mask / buffer: the bare name for the first group (the v1 layout)."""
    return name if index == 0 else f"group{index}/{name}"


def buffer_names(group: "PruningGroup") -> list[str]:
    """State-dict keys of a group's saliency buffers: target names when there is one tracked tensor per
    target (element-wise granularities), the unit groups' mask names for a unit-level saliency (one buffer per
    group of units), else positions (units spanning several tensors)."""
    if group.saliency.per_unit:
        return list(group.granularity.mask_names)
    if len(group.params) == len(group.targets):
        return [t.name for t in group.targets]
    return [str(j) for j in range(len(group.params))]


def _group_entries(entries: dict, index: int) -> dict:
    """The entries of group ``index`` in a `group_key`-keyed dict, with the group prefix removed."""
    if index == 0:
        return {k: v for k, v in entries.items() if not _OTHER_GROUP.match(k)}
    prefix = group_key(index, "")
    return {k[len(prefix):]: v for k, v in entries.items() if k.startswith(prefix)}


def pruner_state_dict(pruner: "Pruner") -> dict:
    """Masks, saliency buffers, schedules and counters of ``pruner`` (tensors cloned)."""
    first = pruner.groups[0] if pruner.groups else None
    masks, saliency, granularity = {}, {}, {}
    groups = []
    for i, g in enumerate(pruner.groups):
        names = g.granularity.mask_names
        masks.update({group_key(i, n): m.clone() for n, m in zip(names, g.masks)})
        keys = buffer_names(g)
        for b, bufs in g.saliency.state_dict().items():
            saliency.setdefault(b, {}).update({group_key(i, n): t.clone() for n, t in zip(keys, bufs)})
        granularity.update({group_key(i, n): t.clone() for n, t in g.granularity.state_dict().items()})
        groups.append({"config": g.config.model_dump(mode="json"), "mask_sparsity": g.mask_sparsity,
                       "mask_updates": g.mask_updates, "schedule": g.schedule.state_dict()})
    return {
        "version": STATE_VERSION,
        "config": pruner.config.model_dump(mode="json"),
        "targets": [t.name for t in pruner.targets],
        "step": pruner.step,
        "skipped_steps": pruner.skipped_steps,
        "mask_sparsity": first.mask_sparsity if first else 0.0,
        "mask_updates": first.mask_updates if first else 0,
        "finalized": pruner.finalized,
        "groups": groups,
        "masks": masks,
        "saliency": saliency,
        "granularity": granularity,  # what a granularity keeps besides masks (`Granularity.state_dict`)
    }


def load_pruner_state(pruner: "Pruner", state: dict) -> None:
    """Restore a `pruner_state_dict` into ``pruner`` (call under ``torch.no_grad()``): refuses a state
    that cannot be resumed (`check_resumable`), applies the masks, and finalizes
    the pruner if the state was written by a finalized one."""

    if state.get("version") != STATE_VERSION:
        raise ValueError(f"pruning state version {state.get('version')!r} is not supported (expected {STATE_VERSION})")
    groups_state = state.get("groups") or [{"config": state.get("config", {}), "mask_sparsity": state["mask_sparsity"],
                                            "mask_updates": state["mask_updates"], "schedule": {}}]
    check_resumable(pruner, state, groups_state)
    for i, (g, saved) in enumerate(zip(pruner.groups, groups_state)):
        names = g.granularity.mask_names
        for name, mask in zip(names, g.masks):
            mask.copy_(state["masks"][group_key(i, name)])
        if not state.get("finalized"):
            keys = buffer_names(g)
            g.saliency.load_state_dict(
                {b: [state["saliency"][b][group_key(i, n)] for n in keys] for b in g.saliency.buffer_names}
            )
        g.granularity.load_state_dict(_group_entries(state.get("granularity") or {}, i))
        g.mask_sparsity = float(saved["mask_sparsity"])
        g.mask_updates = int(saved["mask_updates"])
        g.schedule.load_state_dict(saved.get("schedule") or {})
        g.folded = 0
        g.received_grad = [True] * len(g.params)  # the saved buffers carry the history (see PruningGroup)
    pruner.step = int(state["step"])
    pruner.skipped_steps = int(state["skipped_steps"])
    for component in pruner.l1:
        component.step = pruner.step
    pruner.apply_masks()
    if state.get("finalized"):
        pruner.finalize()


#: config fields whose change makes saved buffers / masks meaningless for this run
_FATAL = ("saliency", "granularity")
#: fields that change *what* is pruned: resuming would mix two runs silently
_TARGETING = ("include", "exclude")


class PruningStateError(ValueError):
    """A saved pruning state that this pruner cannot resume (other targets, saliency, granularity, ...)."""


def check_resumable(pruner, state: dict, groups_state: list) -> None:
    problems = []
    if len(groups_state) != len(pruner.groups):
        problems.append(f"it holds {len(groups_state)} pruning config(s), this pruner has {len(pruner.groups)}")
    names = [t.name for t in pruner.targets]
    if list(state.get("targets", [])) != names:
        missing = sorted(set(names) - set(state.get("targets", [])))
        extra = sorted(set(state.get("targets", [])) - set(names))
        problems.append(
            "it was saved for other targets: "
            f"missing from the state: {missing[:5] or 'none'}; unknown to this model: {extra[:5] or 'none'}"
        )
    changed = []
    for i, (g, saved) in enumerate(zip(pruner.groups, groups_state)):
        old, new = saved.get("config", {}), g.config.model_dump(mode="json")
        where = f"config {i}: " if len(pruner.groups) > 1 else ""
        for field in _FATAL:
            before = old.get(field, "unstructured" if field == "granularity" else None)
            if before != new[field]:
                problems.append(f"{where}it was written with {field}={before!r}, this config has {field}={new[field]!r}")
        changed += [f"{where}{k}: {old[k]!r} -> {new[k]!r}" for k in new if k in old and k not in _FATAL and old[k] != new[k]]
    if not problems:
        for i, g in enumerate(pruner.groups):
            for name, mask in zip(g.granularity.mask_names, g.masks):
                key = group_key(i, name)
                saved = state["masks"].get(key)
                if saved is None or tuple(saved.shape) != tuple(mask.shape):
                    problems.append(f"pruning state masks are missing or have the wrong shape for: {key}")
    if problems:
        raise PruningStateError("this pruning state cannot be resumed: " + "; ".join(problems))
    if changed:
        logger.warning("prune_callbacks: resuming a pruning state with changed config fields: %s", "; ".join(changed))
