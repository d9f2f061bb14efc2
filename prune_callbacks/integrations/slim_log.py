"""What slimming cut, in one line: every adapter that slims (Trainer, Accelerate, recipe) logs it the same way.

`describe_slim` turns the summary `prune_callbacks.export.slim` returns (``params_before``,
``params_after``, ``config``: ``field -> [old, new]``, ``kept``) into
``slimmed the model: 22.7M -> 19.2M parameters (-15.4%); config intermediate_size 1536 -> 768``;
`log_slim` logs it as a warning, since INFO is dropped by most training scripts and a saved model
whose shape changed must not surprise its user. No transformers import here.
"""

from __future__ import annotations

import logging
from typing import Mapping

logger = logging.getLogger("prune_callbacks.slim")


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def config_changes(summary: Mapping) -> str:
    """``intermediate_size 1536 -> 768, num_hidden_layers 12 -> 9`` (list-valued fields by their length)."""
    parts = []
    for field, (old, new) in (summary.get("config") or {}).items():
        if isinstance(old, (list, tuple)) or isinstance(new, (list, tuple)):
            parts.append(f"{field} ({len(old or [])} -> {len(new or [])} entries)")
        else:
            parts.append(f"{field} {old} -> {new}")
    return ", ".join(parts)


def describe_slim(summary: Mapping) -> str:
    before, after = int(summary["params_before"]), int(summary["params_after"])
    change = (after - before) / before if before else 0.0
    changes = config_changes(summary)
    return (f"slimmed the model: {_count(before)} -> {_count(after)} parameters ({before:,} -> {after:,}, "
            f"{change:+.1%}); config " + (changes if changes else "unchanged"))


def log_slim(summary: Mapping) -> None:
    logger.warning("prune_callbacks: %s", describe_slim(summary))
