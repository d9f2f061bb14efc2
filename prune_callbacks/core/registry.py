"""Named parts of the engine: saliencies, schedules and granularities.

A ``PruningConfig`` names its parts (``saliency="taylor"``, ``schedule="cubic"``,
``granularity="2:4"``); the config validates those names against these
registries, so a part registered here is usable from Python and from a YAML
recipe alike::

    from prune_callbacks import Saliency, register_saliency

    @register_saliency("squared_taylor")
    class SquaredTaylor(Saliency):
        ...

    PruningConfig(saliency="squared_taylor")

Built-in parts register themselves when their module is imported; a registry
imports its built-ins module on first lookup, so ``registry.names()`` is always
complete. A granularity may also register a *pattern* (``N:M`` matches ``2:4``,
``4:8``, ...): the matched groups reach the class's ``from_name``.
"""

from __future__ import annotations

import re
from importlib import import_module
from typing import Any, Callable, Optional


class Registry:
    """Name -> class, with optional regex patterns; errors list what is valid."""

    def __init__(self, kind: str, builtins: str):
        self.kind = kind
        self._builtins = builtins
        self._loaded = False
        self._items: dict[str, Any] = {}
        self._patterns: list[tuple[re.Pattern, str, Any]] = []

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            import_module(self._builtins)

    def register(self, name: str, obj: Any = None, *, pattern: Optional[str] = None, replace: bool = False) -> Callable:
        """Register ``obj`` under ``name`` (usable as a decorator). ``pattern`` (a regex) also matches names
        such as ``2:4``; ``name`` is then how the pattern is shown in messages (``"N:M"``)."""

        def add(target: Any) -> Any:
            if not isinstance(name, str) or not name:
                raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
            if pattern is None:
                if name in self._items and self._items[name] is not target and not replace:
                    raise ValueError(f"{self.kind} {name!r} is already registered ({self._items[name]!r}); pass replace=True")
                self._items[name] = target
            else:
                self._patterns = [p for p in self._patterns if p[1] != name] + [(re.compile(pattern), name, target)]
            if getattr(target, "name", None) in (None, "base"):
                try:
                    target.name = name
                except (AttributeError, TypeError):
                    pass
            return target

        return add if obj is None else add(obj)

    def resolve(self, name: str) -> tuple[Any, tuple[str, ...]]:
        """The class registered for ``name`` and the pattern's groups (``()`` for a plain name)."""
        self._load()
        if name in self._items:
            return self._items[name], ()
        for regex, _, target in self._patterns:
            match = regex.fullmatch(name)
            if match:
                return target, match.groups()
        raise KeyError(f"{self.kind}={name!r} is unknown; valid: {', '.join(self.names())}")

    def get(self, name: str) -> Any:
        return self.resolve(name)[0]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            self.resolve(name)
        except KeyError:
            return False
        return True

    def classes(self) -> list[Any]:
        """Every registered class (plain names and patterns), built-ins included."""
        self._load()
        return [*self._items.values(), *(target for _, _, target in self._patterns)]

    def names(self) -> list[str]:
        self._load()
        return [*self._items, *(shown for _, shown, _ in self._patterns)]


SALIENCIES = Registry("saliency", "prune_callbacks.methods.saliency")
SCHEDULES = Registry("schedule", "prune_callbacks.methods.schedule")
GRANULARITIES = Registry("granularity", "prune_callbacks.methods.granularity")


def register_saliency(name: str, cls: Any = None, **kwargs):
    """Register a `~prune_callbacks.methods.saliency.Saliency` subclass under ``name``."""
    return SALIENCIES.register(name, cls, **kwargs)


def register_schedule(name: str, cls: Any = None, **kwargs):
    """Register a `~prune_callbacks.methods.schedule.Schedule` subclass under ``name``."""
    return SCHEDULES.register(name, cls, **kwargs)


def register_granularity(name: str, cls: Any = None, **kwargs):
    """Register a `~prune_callbacks.methods.granularity.Granularity` subclass under ``name`` (or a ``pattern``)."""
    return GRANULARITIES.register(name, cls, **kwargs)
