"""Whether a saved pruning state can be resumed by this pruner: refuse what cannot, warn what changed."""

from __future__ import annotations

import logging

from .pruner_state import group_key

logger = logging.getLogger("prune_callbacks.pruner")

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
