"""The configs an adapter is given: a `PruningConfig`, a dict, a list of them, or a YAML file.

One reader for both adapters (`make_callbacks`, `AcceleratePruningHook`).

A YAML file is read by :func:`prune_callbacks.integrations.yaml_files.read_yaml`, the
reader ``prune-callbacks validate`` uses (safe loading, duplicate keys refused,
line numbers), and its problems are reported the same way
(``file:line: pruning.field: message``). The file is a recipe (its ``pruning:``
section: a mapping, or a list of mappings for several configs) or a bare
mapping of `PruningConfig` fields. No transformers import here.
"""

from __future__ import annotations

import os
from typing import Sequence, Union

from prune_callbacks.core.config import PruningConfig, PruningConfigError, make_config
from prune_callbacks.core.config import make_configs as core_make_configs

OneConfig = Union[PruningConfig, dict, None]
ConfigLike = Union[OneConfig, str, os.PathLike, Sequence[Union[PruningConfig, dict]]]
Configs = Union[PruningConfig, list]  # what a Pruner takes: one config or a list of them


class ConfigFileError(PruningConfigError):
    """A config file that cannot be used; ``problems`` holds ``(yaml path, message)`` pairs."""

    def __init__(self, message: str, problems=()):
        super().__init__(message)
        self.problems = list(problems)


def _from_located(exc) -> ConfigFileError:
    return ConfigFileError(str(exc), exc.problems)


def config_from_file(path: Union[str, os.PathLike]) -> Configs:
    """The `PruningConfig` (or list of them) of a YAML file; `ConfigFileError` naming every problem."""
    from prune_callbacks.integrations.yaml_files import LocatedProblems, read_yaml

    source = str(path)
    try:
        data, lines = read_yaml(path)
    except LocatedProblems as exc:
        raise _from_located(exc) from None
    prefix = "pruning" if "pruning" in data else ""
    section = data["pruning"] if prefix else data
    items = section if isinstance(section, list) else [section]
    if not items or not all(isinstance(item, dict) for item in items):
        where = prefix or "<root>"
        raise _from_located(LocatedProblems(
            [(prefix, f"{where} must be a mapping of PruningConfig fields or a list of such mappings "
                      f"(got {type(section).__name__})")], source=source, lines=lines))
    configs, problems = [], []
    for i, item in enumerate(items):
        base = ".".join(p for p in (prefix, str(i) if isinstance(section, list) else "") if p)
        try:
            configs.append(PruningConfig(**item))
        except PruningConfigError as exc:  # the core's problems, as data: (field path, message)
            for field, message in exc.problems or [("", str(exc))]:
                problems.append((".".join(p for p in (base, field) if p), message))
    if problems:
        raise _from_located(LocatedProblems(problems, source=source, lines=lines))
    return configs if isinstance(section, list) else configs[0]


def make_configs(config: ConfigLike, overrides: dict) -> Configs:
    """One `PruningConfig` (``overrides`` applied), or a list of them for several configs in one run."""
    if isinstance(config, (str, os.PathLike)):
        config = config_from_file(config)
    if isinstance(config, (list, tuple)):
        if overrides:
            raise PruningConfigError(
                f"keyword overrides ({', '.join(sorted(overrides))}) apply to one config; with a list of configs "
                "set them in each config")
        configs = core_make_configs(list(config))  # PruningConfig / L1Config / dicts, as the Pruner takes them
        return configs if len(configs) > 1 else configs[0]
    return make_config(config, **overrides)


def as_list(configs: Configs) -> list:
    """``configs`` as a list (one config -> ``[config]``)."""
    return list(configs) if isinstance(configs, (list, tuple)) else [configs]
