"""The package layout is the architecture: imports point down the layers, never up, never in a cycle.

Layers, bottom to top (a module may import its own layer and the ones below):

    core            config models, registry, targets, counting/report, figures, state files
    methods         saliencies, schedules, selection, granularities, step components, unit descriptions
    engine          the Pruner that composes them, its state
    export          slim, sparse checkpoints, semi-structured, low-rank factors
    controllers     accuracy guard, distillation
    integrations    Trainer and Accelerate adapters
    recipe          YAML recipes and the finetune workflow
    analysis        redundancy analysis (reads recipes to run)
    cli             the command line

``assets`` (offline models and data) stands beside the layers: only recipe, analysis and cli use it.
Imports under ``if TYPE_CHECKING:`` are not runtime imports and are not counted.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "prune_callbacks"
LAYERS = ["core", "methods", "engine", "export", "controllers", "integrations", "recipe", "analysis", "cli"]
RANK = {name: i for i, name in enumerate(LAYERS)}
OUTSIDE = {"_lazy": -1, "_moved": -1, "assets": RANK["recipe"]}  # helpers below everything; assets beside recipe
ADAPTERS = ("prune_callbacks.integrations", "prune_callbacks.recipe", "prune_callbacks.analysis", "prune_callbacks.cli")


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def _runtime_imports(tree: ast.AST):
    """Import nodes, skipping ``if TYPE_CHECKING:`` bodies."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in _runtime_imports(child))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _runtime_imports(node)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, (path, is_package) in modules.items():
        deps = set()
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    candidate = f"{target}.{alias.name}"
                    deps.add(candidate if candidate in modules else target)
            else:
                deps.update(alias.name for alias in node.names)
        graph[name] = {d for d in deps if d in modules and d != name and d != "prune_callbacks"}
    return graph


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) == 1:
        return None  # the package's __init__: the public API, may import any layer lazily
    top = parts[1]
    return OUTSIDE.get(top, RANK.get(top))


def test_every_module_sits_in_a_layer():
    unplaced = sorted(m for m in _modules() if "." in m and _layer(m) is None)
    assert not unplaced, f"modules outside the layers {LAYERS} (+ {sorted(OUTSIDE)}): {unplaced}"


def test_imports_point_down_the_layers():
    upward = []
    for module, deps in _graph().items():
        mine = _layer(module)
        if mine is None:
            continue
        upward += [f"{module} -> {dep}" for dep in deps if (_layer(dep) or -1) > mine]
    assert not upward, "imports that point up the layers:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_layer_rule_can_fail():
    """The checks above see a planted upward import and a planted cycle (so they are not vacuous)."""
    global _graph
    real = _graph
    try:
        _graph = lambda: {"prune_callbacks.core.a": {"prune_callbacks.recipe.b"}, "prune_callbacks.recipe.b": {"prune_callbacks.core.a"}}
        with pytest.raises(AssertionError, match="point up"):
            test_imports_point_down_the_layers()
        with pytest.raises(AssertionError, match="cycles"):
            test_no_import_cycles()
    finally:
        _graph = real


def test_import_prune_callbacks_imports_no_adapter():
    code = (
        "import sys, json, prune_callbacks; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'accelerate', 'prune_callbacks'))))"
    )
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    offenders = [m for m in loaded if m.startswith(ADAPTERS) or m.split(".")[0] in ("transformers", "accelerate")]
    assert not offenders, f"`import prune_callbacks` imported adapter modules: {offenders}"


@pytest.mark.parametrize("old, new, name", [
    ("prune_callbacks.sparse_io", "prune_callbacks.export.sparse_io", "save_sparse"),
    ("prune_callbacks.structured", "prune_callbacks.export", "slim_pruned"),
    ("prune_callbacks.structured.slim", "prune_callbacks.export.slim", "slim"),
    ("prune_callbacks.distillation", "prune_callbacks.controllers.distillation", "DistillationConfig"),
    ("prune_callbacks.config", "prune_callbacks.core.config", "PruningConfig"),
    ("prune_callbacks.pruner", "prune_callbacks.engine.pruner", "Pruner"),
    ("prune_callbacks.state_compat", "prune_callbacks.engine.state", "PruningStateError"),
    ("prune_callbacks.integrations.accelerate", "prune_callbacks.integrations.accelerate.hook", "AcceleratePruningHook"),
])
def test_import_paths_of_the_flat_layout_still_work(old, new, name):
    """Round 2's documented import paths (README, examples) import the same objects from their new homes."""
    code = (f"import importlib; old = importlib.import_module({old!r}); new = importlib.import_module({new!r}); "
            f"assert getattr(old, {name!r}) is getattr(new, {name!r})")
    subprocess.run([sys.executable, "-c", code], check=True)
