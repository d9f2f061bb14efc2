"""sparsity.png: target vs achieved sparsity over the optimizer steps with the metric, and the
per-layer sparsity of the pruned layers as a layer x kind heatmap."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from prune_callbacks.core.targets import block_index
from prune_callbacks.recipe.guard_artifacts import plot_trajectory
from prune_callbacks.recipe.summary import dense_step


def layer_grid(per_target: Mapping[str, Mapping]) -> tuple[list[str], list[int], list[list[float]]]:
    """(kinds, layer indices, sparsity[kind][layer]); NaN where a kind has no tensor in a layer."""
    cells: dict[tuple[str, int], float] = {}
    for name, row in per_target.items():
        parsed = block_index(name)
        kind, layer = (parsed[2], parsed[1]) if parsed else (name, 0)
        cells[(kind, layer)] = float(row["sparsity"])
    kinds = list(dict.fromkeys(k for k, _ in cells))
    layers = sorted({i for _, i in cells})
    grid = [[cells.get((k, i), float("nan")) for i in layers] for k in kinds]
    return kinds, layers, grid


def plot_report(report: Mapping, path: "str | Path") -> Path:
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless

    metric = report["metric"]
    history, evals = report["history"], report["evaluations"]
    fig = Figure(figsize=(13, 4.8))
    ax, heat = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.15, 1]})

    ax.plot(history["step"], history["target"], "--", color="tab:gray", label="target (schedule)")
    ax.plot(history["step"], history["achieved"], "-", color="tab:blue", label="achieved (pruned layers)")
    for guard in report.get("accuracy_guard") or []:
        plot_trajectory(ax, guard["trajectory"])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("sparsity of the pruned layers")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    right = ax.twinx()
    points = [(e["step"], e[metric]) for e in evals if metric in e]
    if points:
        right.plot(*zip(*points), "o-", color="tab:orange", label=f"{metric} (during training)")
    dense = (report.get("dense_metrics") or {}).get(metric)
    if dense is not None:
        step = dense_step(report) or 0
        when = "before fine-tuning" if step == 0 else "before pruning"
        right.plot([step], [dense], "s", color="tab:green", label=f"{metric} dense (step {step}, {when})")
    pruned = report["pruned_metrics"].get(metric)
    if pruned is not None:
        right.plot([report["training"]["global_step"]], [pruned], "*", markersize=13, color="tab:red",
                   label=f"{metric} pruned, final")
    right.set_ylabel(metric)
    if metric == "perplexity":
        right.set_yscale("log")
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="lower right", fontsize=8)
    ax.set_title(f"sparsity and {metric} over training")

    kinds, layers, grid = layer_grid(report["per_target"])
    if kinds:
        image = heat.imshow(np.array(grid, dtype=float), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        heat.set_yticks(range(len(kinds)), kinds, fontsize=7)
        step = max(1, len(layers) // 16)
        heat.set_xticks(range(0, len(layers), step), [str(i) for i in layers[::step]], fontsize=7)
        heat.set_xlabel("layer")
        if len(layers) * len(kinds) <= 80:
            for r, row in enumerate(grid):
                for c, value in enumerate(row):
                    if value == value:  # not NaN
                        heat.text(c, r, f"{value:.0%}", ha="center", va="center", fontsize=6,
                                  color="white" if value < 0.6 else "black")
        fig.colorbar(image, ax=heat, fraction=0.046, pad=0.02, label="sparsity")
    heat.set_title("per-layer sparsity (final)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
