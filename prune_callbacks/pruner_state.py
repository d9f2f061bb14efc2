"""The pruning state of a `~prune_callbacks.pruner.Pruner` in memory: its layout, taken and restored.

``Pruner.state_dict()`` / ``Pruner.load_state_dict()`` delegate here. The layout (version
`STATE_VERSION`): the first group's masks and saliency buffers are keyed by target name (the
original single-config layout), further groups' by ``group<i>/<name>`` (`group_key`); per-group
counters and schedules are in ``groups``. :mod:`.state_io` writes this dict to disk and reads it
back; :mod:`.state_compat` decides whether a saved one can be resumed by a given pruner.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .pruner import Pruner
    from .steps.pruning import PruningGroup

STATE_VERSION = 1
_OTHER_GROUP = re.compile(r"group\d+/")


def group_key(index: int, name: str) -> str:
    """State-dict key of a group's mask / buffer: the bare name for the first group (the v1 layout)."""
    return name if index == 0 else f"group{index}/{name}"


def buffer_names(group: "PruningGroup") -> list[str]:
    """State-dict keys of a group's saliency buffers: target names when there is one tracked tensor per
    target (element-wise granularities), else positions (units spanning several tensors)."""
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
    that cannot be resumed (:func:`.state_compat.check_resumable`), applies the masks, and finalizes
    the pruner if the state was written by a finalized one."""
    from .state_compat import check_resumable

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
