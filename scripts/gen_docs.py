#!/usr/bin/env python
"""Generate the documentation pages that are derived from the code (never edited by hand).

* ``docs/reference/configuration.md``: every field of every user-facing pydantic config model in
  ``prune_callbacks`` (found by importing the package, not by a list kept here): type, default, allowed
  values and description, read from the models themselves;
* ``docs/reference/contract.md``: the contract table of ``tests/test_contract.py`` (``CASES``: granularity x
  path x check, and where each cell is proven) as a matrix; a short note while the table is absent.

``python scripts/gen_docs.py`` rewrites the files; ``python scripts/gen_docs.py --check`` exits 1 if a
committed file differs from a fresh generation (``tests/test_docs.py`` runs the same comparison).
"""

from __future__ import annotations

import argparse
import enum
import importlib
import importlib.util
import inspect
import pkgutil
import re
import sys
import types
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIG_PAGE = ROOT / "docs" / "reference" / "configuration.md"

#: the order models are listed in; models found in the package but not named here follow, by name
PREFERRED_ORDER = ("PruningConfig", "AccuracyGuardConfig", "L1Config", "DistillationConfig", "Recipe", "ModelSection",
                   "DataSection", "EvaluationSection", "OutputSection")

#: where a model is used, for the page's headings (recipe sections are keyed by the recipe's field names)
_RECIPE_KEYS = {"ModelSection": "model", "DataSection": "data", "EvaluationSection": "evaluation",
                "OutputSection": "output"}


def _config_models() -> list[type]:
    """Every user-facing config model of the package: a pydantic model with fields that rejects unknown keys."""
    import prune_callbacks
    from pydantic import BaseModel

    found: dict[str, type] = {}
    for info in sorted(pkgutil.walk_packages(prune_callbacks.__path__, "prune_callbacks."), key=lambda m: m.name):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseModel) and obj.__module__ == module.__name__
                    and not name.startswith("_") and obj.model_fields
                    and obj.model_config.get("extra") == "forbid"):
                found[name] = obj
    order = {name: i for i, name in enumerate(PREFERRED_ORDER)}
    return [found[name] for name in sorted(found, key=lambda n: (order.get(n, len(order)), n))]


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        metadata = " ".join(type(m).__name__ for m in args[1:])
        inner = _type_name(args[0])
        return inner if "Strict" not in metadata else inner
    if origin is typing.Literal:
        return "str" if all(isinstance(a, str) for a in args) else " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = []
        for arg in args:
            name = "null" if arg is type(None) else _type_name(arg)
            if name not in parts:
                parts.append(name)
        return " | ".join(parts)
    if origin in (list, tuple, set):
        return f"list[{', '.join(_type_name(a) for a in args)}]" if args else "list"
    if origin is dict:
        return f"mapping {_type_name(args[0])} → {_type_name(args[1])}" if args else "mapping"
    if annotation is typing.Any:
        return "any"
    if inspect.isclass(annotation):
        return {"NoneType": "null"}.get(annotation.__name__, annotation.__name__)
    return str(annotation).replace("typing.", "")


def _literals(annotation) -> list:
    """The values of every Literal inside an annotation (bool members of a Union included)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return list(typing.get_args(annotation))
    values: list = []
    for arg in typing.get_args(annotation):
        if arg is bool:
            values += [True, False]
        elif arg is not type(None):
            values += _literals(arg)
        if arg is type(None) and origin in (typing.Union, types.UnionType):
            values.append(None)
    return values if any(v is not None for v in values) else []


def _yaml(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value)


def _registries() -> dict[str, list[str]]:
    from prune_callbacks.core.registry import GRANULARITIES, SALIENCIES, SCHEDULES

    return {"saliency": list(SALIENCIES.names()), "schedule": list(SCHEDULES.names()),
            "granularity": list(GRANULARITIES.names())}


def _constraints(field) -> list[str]:
    out = []
    for meta in field.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"), ("min_length", "length ≥")):
            value = getattr(meta, attr, None)
            if value is not None:
                out.append(f"{sign} {value}")
    return out


def _default(field) -> str:
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return f"`{type(value).__name__}()` defaults"
        return f"`{_yaml(value)}`"
    if field.default is PydanticUndefined:
        return "**required**"
    return f"`{_yaml(field.default)}`"


def _allowed(model, name, field, registries) -> str:
    if name in registries and model.__name__ == "PruningConfig":
        return ", ".join(f"`{v}`" for v in registries[name]) + ", or a registered name"
    literals = _literals(field.annotation)
    parts = [", ".join(f"`{_yaml(v)}`" for v in literals)] if literals else []
    parts += _constraints(field)
    return "; ".join(parts)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _linked(type_name: str, names: set[str]) -> str:
    """A type cell whose model names link to their sections on this page."""
    for name in sorted(names, key=len, reverse=True):
        type_name = re.sub(rf"\b{name}\b", f"[{name}](#{name.lower()})", type_name)
    return type_name


def _first_paragraph(doc: str | None) -> str:
    return " ".join(inspect.cleandoc(doc or "").split("\n\n")[0].split())


def config_page() -> str:
    registries = _registries()
    lines = [
        "<!-- Generated by scripts/gen_docs.py from the pydantic models: do not edit by hand. -->",
        "# Configuration reference",
        "",
        "Every field of every configuration model, read from the models themselves "
        "(`python scripts/gen_docs.py` regenerates this page; `tests/test_docs.py` fails when it is stale). "
        "Unknown keys are rejected everywhere; a setting that does not apply to the chosen parts is an error "
        "naming the field. In a recipe the same fields appear under the section named in each heading.",
        "",
    ]
    models = _config_models()
    names = {m.__name__ for m in models}
    for model in models:
        where = f"`{model.__module__}`"
        if model.__name__ in _RECIPE_KEYS:
            where += f"; recipe section `{_RECIPE_KEYS[model.__name__]}:`"
        elif model.__name__ == "PruningConfig":
            where += "; recipe section `pruning:` (one mapping or a list of them)"
        elif model.__name__ == "AccuracyGuardConfig":
            where += "; `PruningConfig.accuracy_guard`, recipe key `pruning.accuracy_guard`"
        elif model.__name__ == "DistillationConfig":
            where += "; recipe section `distillation:`"
        elif model.__name__ == "Recipe":
            where += "; the top level of a recipe YAML file"
        lines += [f"## {model.__name__}", "", f"{_first_paragraph(model.__doc__)} ({where})", "",
                  "| field | type | default | allowed | description |", "| --- | --- | --- | --- | --- |"]
        for name, field in model.model_fields.items():
            lines.append(f"| `{name}` | {_linked(_cell(_type_name(field.annotation)), names)} | {_cell(_default(field))} | "
                         f"{_cell(_allowed(model, name, field, registries))} | {_cell(field.description or '')} |")
        lines.append("")
    return "\n".join(lines)


CONTRACT_PAGE = ROOT / "docs" / "reference" / "contract.md"
CONTRACT_TABLE = ROOT / "tests" / "test_contract.py"


def _contract_module():
    tests = str(CONTRACT_TABLE.parent)
    if tests not in sys.path:
        sys.path.insert(0, tests)
    spec = importlib.util.spec_from_file_location("_contract_table", CONTRACT_TABLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the table is built
    spec.loader.exec_module(module)
    return module


def contract_page() -> str:
    """The contract table (`CASES` of tests/test_contract.py: granularity × path × check) as a matrix."""
    lines = ["<!-- Generated by scripts/gen_docs.py from tests/test_contract.py (CASES): do not edit by hand. -->",
             "# Contract matrix", ""]
    if not CONTRACT_TABLE.is_file():
        return "\n".join(lines + ["The contract table `tests/test_contract.py` is not in this tree; this page is "
                                   "generated from it when it is.", ""])
    table = _contract_module()
    lines += ["What the test suite proves for every granularity on every path, read from `CASES` in "
              "`tests/test_contract.py` (its docstring below says what each check means). ✓: tested by that module; "
              "✓ n: proven by the test in note n; — n: not run, for the reason in note n; ✗ n: tested and failing today, "
              "for the known defect in note n.", ""]
    notes: list[str] = []

    def note(text: str) -> int:
        if text not in notes:
            notes.append(text)
        return notes.index(text) + 1

    cases = {(c["granularity"], c["path"], c["check"]): c for c in table.CASES}
    defects = getattr(table, "KNOWN_DEFECTS", {})
    granularities = list(dict.fromkeys(c["granularity"] for c in table.CASES))
    lines += ["| granularity | path | " + " | ".join(f"`{c}`" for c in table.CHECKS) + " |",
              "| --- | --- | " + " | ".join("---" for _ in table.CHECKS) + " |"]
    for granularity in granularities:
        for path in table.PATHS:
            cells = []
            for check in table.CHECKS:
                case = cases.get((granularity, path, check))
                if case is None:
                    cells.append("")
                elif (granularity, path, check) in defects:
                    cells.append(f"✗ {note('known defect (the test is marked xfail): ' + defects[granularity, path, check])}")
                elif case["where"] == "here":
                    cells.append("✓")
                elif case["where"]:
                    cells.append(f"✓ {note('`' + case['where'] + '`: ' + case.get('why', ''))}")
                else:
                    cells.append(f"— {note(case.get('why', 'not run'))}")
            lines.append(f"| `{granularity}` | {path} | " + " | ".join(cells) + " |")
    lines += ["", "Notes:", ""] + [f"{i}. {_cell(text)}" for i, text in enumerate(notes, 1)]
    lines += ["", "## What the checks mean", "", "From the docstring of `tests/test_contract.py`:", "",
              inspect.cleandoc(table.__doc__ or "").replace("<", "&lt;").replace(">", "&gt;"), ""]
    return "\n".join(lines)


PAGES = {CONFIG_PAGE: config_page, CONTRACT_PAGE: contract_page}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed page differs from a fresh one")
    args = parser.parse_args(argv)
    stale = []
    for path, build in PAGES.items():
        text = build()
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
    for path in stale:
        print(f"{path.relative_to(ROOT)} is stale: run python scripts/gen_docs.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
