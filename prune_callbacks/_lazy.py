"""Lazy attribute access for a package's public names (PEP 562): import the submodule on first use."""

from __future__ import annotations

from importlib import import_module
from typing import Callable


def lazy_exports(package: str, lazy: dict, names: list) -> "tuple[Callable, Callable]":
    """``(__getattr__, __dir__)`` for ``package``: ``lazy`` maps a name to the relative module that defines it,
    ``names`` is the package's ``__all__``. Found values are cached in the package's namespace."""
    namespace = import_module(package).__dict__

    def __getattr__(name):
        if name in lazy:
            value = getattr(import_module(lazy[name], package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(names)

    return __getattr__, __dir__
